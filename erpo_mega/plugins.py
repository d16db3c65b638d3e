"""Resolve a user's plug-in named in YAML as "package.module:function" (stdlib only, so every
room, the pure algorithm layer included, can use it)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def import_callable(spec: str, kind: str, expected: str = "'package.module:function'") -> Callable:
    """The callable `spec` names; a ValueError naming `kind` and `spec` when it cannot be had."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{kind} '{spec}': expected {expected}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{kind} '{spec}': cannot import module '{module_name}': {e}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"{kind} '{spec}': module '{module_name}' has no attribute '{attr}'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{kind} '{spec}': '{attr}' is not callable")
    return fn
