"""Thin wrapper kept at the top of the clone: ``python evaluate.py ...``, the same as ``imagetok-evaluate ...``
(:mod:`imagetok.cli.evaluate`, over the config tree in ``configs/``)."""

from imagetok.cli.evaluate import main

if __name__ == "__main__":
    main()
