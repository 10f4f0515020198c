"""Build objects from ``{"_target_": "imagetok....", **kwargs}`` dicts, the format Hydra configs use.

This is what loads a saved tokenizer, so it is deliberately narrower than ``hydra.utils.instantiate``:
it only builds ``nn.Module`` classes defined inside the ``imagetok`` package (a ``config.json`` naming ``os.system`` is
refused), and a bad value comes back as a :class:`ConfigValueError` naming the full key.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from imagetok.errors import ConfigValueError

ALLOWED_PREFIX = "imagetok."


def locate(target: str, key: str) -> Any:
    """Import ``target`` (``"imagetok.module.Name"``), refusing anything outside ``imagetok``."""
    if not isinstance(target, str) or not target.startswith(ALLOWED_PREFIX):
        raise ConfigValueError(f"{key}._target_" if key else "_target_", target,
                               "a class inside the imagetok package (foreign targets are refused)")
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigValueError(f"{key}._target_", target, f"an existing imagetok class ({err})") from None
    # A name merely imported into an imagetok module (a function, hydra's instantiate, ...) is not enough:
    # only torch modules defined in imagetok may be built from a saved config.
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__.startswith(ALLOWED_PREFIX)):
        raise ConfigValueError(f"{key}._target_" if key else "_target_", target,
                               "a torch module class defined inside the imagetok package")
    return obj


def build(node: Any, key: str = "") -> Any:
    """Recursively build ``node``: dicts with ``_target_`` become objects, other containers are walked."""
    if isinstance(node, Mapping):
        kwargs = {k: build(v, f"{key}.{k}" if key else str(k)) for k, v in node.items() if k != "_target_"}
        if "_target_" not in node:
            return kwargs
        cls = locate(node["_target_"], key)
        try:
            return cls(**kwargs)
        except ConfigValueError as err:
            raise err.with_prefix(key) from None
        except TypeError as err:  # unknown or missing keyword
            raise ConfigValueError(key, sorted(kwargs), f"the arguments of {node['_target_']} ({err})") from None
    if isinstance(node, (list, tuple)):
        return [build(v, f"{key}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:  # saved configs are resolved; interpolation could run resolvers
        raise ConfigValueError(key, node, "a plain value (interpolations are resolved before saving)")
    return node
