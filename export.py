"""Thin wrapper kept at the top of the clone: ``python export.py ...``, the same as ``imagetok-export ...``
(:mod:`imagetok.cli.export`, over the config tree in ``configs/``)."""

from imagetok.cli.export import main

if __name__ == "__main__":
    main()
