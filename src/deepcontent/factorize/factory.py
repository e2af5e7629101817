"""One factory for every WMF backend.

    make_factorizer("implicit", factors=50, alpha=2.0, eps=1.0, regularization=0.1, num_threads=0)
    make_factorizer("spark", spark=session, factors=50, ...)
    make_factorizer("reference", factors=8, ...)   # numpy oracle, small matrices only

Every backend's ``fit(user_items_counts)`` returns ``(user_factors, item_factors)`` as float32
(n_users, f) and (n_items, f), minimising the same WMF objective (Spark up to its per-row
regularisation scaling; see :mod:`deepcontent.factorize.spark_backend`). Backends import their
engine lazily, so choosing ``"reference"`` never starts Spark.
"""

from __future__ import annotations

import importlib

from deepcontent.factorize.base import Factorizer

__all__ = ["BACKENDS", "make_factorizer"]

BACKENDS: dict[str, str] = {
    "reference": "deepcontent.factorize.reference:ReferenceFactorizer",
    "implicit": "deepcontent.factorize.implicit_backend:ImplicitFactorizer",
    "spark": "deepcontent.factorize.spark_backend:SparkFactorizer",
}


def backend_class(backend: str) -> type[Factorizer]:
    """The :class:`Factorizer` subclass registered under ``backend``."""
    try:
        target = BACKENDS[backend]
    except (KeyError, TypeError):
        raise ValueError(f"unknown factorization backend {backend!r}; choose one of {sorted(BACKENDS)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def make_factorizer(backend: str, **params) -> Factorizer:
    """Build the factorizer for ``backend`` with keyword ``params``.

    Parameters
    ----------
    backend : {"reference", "implicit", "spark"}
    **params
        Common: ``factors, alpha, eps, regularization, iterations, seed``. Backend-specific:
        implicit ``num_threads, use_cg, cg_steps, use_gpu``; spark ``spark`` (required),
        ``reg_param, num_blocks``.

    Raises
    ------
    ValueError
        Unknown backend, or a bad parameter value.
    TypeError
        A parameter the backend does not take (named in the message).
    """
    cls = backend_class(backend)
    try:
        return cls(**params)
    except TypeError as err:
        raise TypeError(f"{backend} backend: {err}") from err
