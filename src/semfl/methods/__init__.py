"""Federated methods, one module each, registered by name."""
from __future__ import annotations

import importlib

from semfl.methods.base import Method, RunContext, get_method, register_method, _METHODS

# method modules register themselves (and their config tables) on import
_MODULES = ["fedavg", "psfl", "stc", "fttq", "fedpaq", "topk", "fedcl", "fedproto", "fedavg_split", "finefed", "fedsfr", "skbs", "fedsfd"]


def _load_all() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(f"semfl.methods.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"semfl.methods.{name}":
                raise


def available_methods() -> list[str]:
    _load_all()
    return sorted(_METHODS)


_load_all()

__all__ = ["Method", "RunContext", "available_methods", "get_method", "register_method"]
