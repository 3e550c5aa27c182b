"""Federated methods, grouped by family; each method module registers itself (and its config table).

Methods are discovered, never listed by hand: every module under ``semfl.methods`` is imported once,
and so is every module that an installed package names in its ``semfl.methods`` entry points, so a new
method needs only its own file (docs/adding-a-method.md).
"""
from __future__ import annotations

import importlib
import pkgutil

from semfl.config import register_validator

from semfl.protocol.method import Method, RunContext, methods_registered, register_method


PLUGIN_GROUP = "semfl.methods"  # entry-point group of methods that live in other packages


def _load_all() -> None:
    for info in pkgutil.walk_packages(__path__, prefix=__name__ + "."):
        importlib.import_module(info.name)
    load_plugins()


def load_plugins() -> list[str]:
    """Import the method modules that installed packages declare (``[project.entry-points."semfl.methods"]``);
    returns their module names. Safe to call again: a module is imported once."""
    from importlib.metadata import entry_points

    importlib.invalidate_caches()
    names = []
    for entry in entry_points(group=PLUGIN_GROUP):
        importlib.import_module(entry.value.split(":")[0])
        names.append(entry.value)
    return names


def available_methods() -> list[str]:
    return sorted(methods_registered())


def get_method(name: str) -> type[Method]:
    if name not in methods_registered():
        raise ValueError(f"method: unknown method {name!r} (allowed: {', '.join(available_methods())})")
    return methods_registered()[name]


def _check_method(cfg) -> None:
    """Config checks that need the registry: the method exists and trains in the asked precision."""
    from semfl.config import ConfigError

    if cfg.method not in methods_registered():
        raise ConfigError(f"method: unknown method {cfg.method!r} (allowed: {', '.join(available_methods())})")
    method = get_method(cfg.method)
    if cfg.train.precision not in method.precisions:
        raise ConfigError(f"train.precision: {cfg.method} trains in {' or '.join(method.precisions)}, "
                          f"got {cfg.train.precision!r}")
    method.check_config(cfg)


_load_all()
register_validator(_check_method)

__all__ = ["Method", "RunContext", "available_methods", "get_method", "register_method"]
