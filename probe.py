"""Thin wrapper kept at the top of the clone: ``python probe.py ...``, the same as ``imagetok-probe ...``
(:mod:`imagetok.cli.probe`, over the config tree in ``configs/``)."""

from imagetok.cli.probe import main

if __name__ == "__main__":
    main()
