"""Hooks named in config (``module:function``), resolved only from trusted code.

A config file travels with job submissions and may be written by someone who cannot run code on
the cluster; a hook is code that runs with the job's credentials. So a hook resolves only when
its module is part of this package (``deepcontent.…``) or lies under a module prefix that the
*environment* of the process allows (``DEEPCONTENT_ALLOW_HOOKS=mycompany.audio,tests_faults``),
which an operator sets where the job runs and a config cannot. Anything else is refused with
:class:`~deepcontent.errors.ConfigError` naming the field and the module.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

from deepcontent.errors import ConfigError

__all__ = ["ALLOW_ENV", "check_hook", "resolve_hook"]

ALLOW_ENV = "DEEPCONTENT_ALLOW_HOOKS"


def _allowed_prefixes() -> list[str]:
    return ["deepcontent"] + [p.strip() for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip()]


def check_hook(path: str, *, field: str) -> tuple[str, str]:
    """Validate ``"package.module:function"`` against the allow-list; returns (module, function)."""
    module, _, name = str(path).partition(":")
    if not module or not name:
        raise ConfigError(f"{field} must look like 'package.module:function', got {path!r}")
    if not any(module == p or module.startswith(p + ".") for p in _allowed_prefixes()):
        raise ConfigError(f"{field}={path!r}: module {module!r} is not allowed to run as a hook; hooks come from "
                          f"the deepcontent package or from module prefixes listed in the {ALLOW_ENV} "
                          f"environment variable where the job runs")
    return module, name


def resolve_hook(path: str, *, field: str) -> Callable:
    """The function a hook names, after :func:`check_hook`."""
    module, name = check_hook(path, field=field)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{field}={path!r} cannot be loaded: {exc}") from None
