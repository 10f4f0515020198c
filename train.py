"""Thin wrapper kept at the top of the clone: ``python train.py ...``, the same as ``imagetok-train ...``
(:mod:`imagetok.cli.train`, over the config tree in ``configs/``)."""

from imagetok.cli.train import main

if __name__ == "__main__":
    main()
