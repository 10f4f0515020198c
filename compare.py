"""Thin wrapper kept at the top of the clone: ``python compare.py ...``, the same as ``imagetok-compare ...``
(:mod:`imagetok.cli.compare`, over the config tree in ``configs/``)."""

from imagetok.cli.compare import main

if __name__ == "__main__":
    main()
