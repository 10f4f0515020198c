"""The Hydra config tree (data, not code): importable so that Hydra finds it as ``pkg://imagetok.configs``
in an installed package. The repository's top-level ``configs`` links here; edit it there or here, it is one tree."""
