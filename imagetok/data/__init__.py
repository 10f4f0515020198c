"""Datasets and datamodules; images leave here as float [-1, 1]."""
