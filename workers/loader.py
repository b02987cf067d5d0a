"""Backends named ``package.module:Class`` in a stage's backend list (benchmarks, plug-ins).

The class is called with the worker's Config and must offer the same methods as the stage's
built-in backends (duck-typed); nothing else about it is checked here.
"""

from __future__ import annotations

import importlib
from typing import Any


def is_object_ref(name: str) -> bool:
    return ":" in name


def load_object(ref: str) -> Any:
    """``"package.module:Attr"`` -> that attribute, with an error that names what is missing."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{ref!r} is not of the form package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for {ref!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no {attr!r}") from None
    return obj
