"""What every factorisation backend shares: its parameters, its ``fit`` contract, the NaN guard.

A backend subclasses :class:`Factorizer` and implements ``_fit``; ``fit`` validates the input
counts before and the factors after, so no backend can hand back NaN/inf or misshapen factors.
Backends are built by name with :func:`deepcontent.factorize.factory.make_factorizer`.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from deepcontent.errors import DeepcontentError
from deepcontent.interactions.weighting import canonical_csr, check_counts

__all__ = ["FactorizationError", "Factorizer", "check_factors"]


class FactorizationError(DeepcontentError, RuntimeError):
    """A backend produced unusable factors (NaN/inf, or the wrong shape)."""


def _bad_rows(factors: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isfinite(factors).all(axis=1)))


def check_factors(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    *,
    backend: str,
    shape: tuple[int, int],
    factors: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Check a backend's result and return it as C-contiguous float32.

    Parameters
    ----------
    user_factors : (n_users, factors)
    item_factors : (n_items, factors)
    backend : str
        Named in the error.
    shape : (n_users, n_items)
        Of the matrix that was factorised.
    factors : int
        Expected rank.

    Raises
    ------
    FactorizationError
        Wrong shapes, or any non-finite value (the message counts the bad rows on each side).
    """
    X = np.asarray(user_factors)
    Y = np.asarray(item_factors)
    want_x, want_y = (shape[0], factors), (shape[1], factors)
    if X.shape != want_x or Y.shape != want_y:
        raise FactorizationError(
            f"{backend} backend returned user factors {X.shape} and item factors {Y.shape}; "
            f"expected {want_x} and {want_y}"
        )
    bad_x, bad_y = _bad_rows(X), _bad_rows(Y)
    if bad_x or bad_y:
        raise FactorizationError(
            f"{backend} backend produced non-finite factors: {bad_x} of {X.shape[0]} user rows and "
            f"{bad_y} of {Y.shape[0]} item rows contain NaN/inf (try a larger regularization, or "
            f"check the input counts)"
        )
    return (np.ascontiguousarray(X, dtype=np.float32), np.ascontiguousarray(Y, dtype=np.float32))


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class Factorizer(abc.ABC):
    """Weighted matrix factorisation of a users × items play-count matrix.

    Minimises Σ_ui c_ui (p_ui − x_uᵀy_i)² + λ(Σ‖x_u‖² + Σ‖y_i‖²) with
    c = 1 + alpha·log(1 + r/eps) (see :mod:`deepcontent.factorize.objective`).

    Parameters
    ----------
    factors : int
        Rank f of the factorisation.
    alpha : float
        Confidence scale (>= 0).
    eps : float
        Count scale (> 0).
    regularization : float
        λ (>= 0), the same for every row.
    iterations : int
        ALS sweeps (one sweep = solve all users, then all items).
    seed : int
        Seeds the initial factors; the same seed gives the same result.
    """

    name: ClassVar[str] = "base"

    def __init__(
        self,
        *,
        factors: int = 50,
        alpha: float = 2.0,
        eps: float = 1.0,
        regularization: float = 0.1,
        iterations: int = 15,
        seed: int = 0,
    ) -> None:
        self.factors = _check_positive_int("factors", factors)
        self.alpha = _check_nonnegative("alpha", alpha)
        self.eps = _check_nonnegative("eps", eps)
        if self.eps == 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.regularization = _check_nonnegative("regularization", regularization)
        self.iterations = _check_positive_int("iterations", iterations)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)

    @property
    def params(self) -> dict:
        """The WMF parameters (what a run manifest records)."""
        return {
            "backend": self.name,
            "factors": self.factors,
            "alpha": self.alpha,
            "eps": self.eps,
            "regularization": self.regularization,
            "iterations": self.iterations,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if k != "backend")
        return f"{type(self).__name__}({args})"

    def fit(self, user_items_counts: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
        """Factorise a play-count matrix.

        Parameters
        ----------
        user_items_counts : scipy.sparse matrix, (n_users, n_items)
            Play counts on the observed pairs (finite, > 0); CSR preferred.

        Returns
        -------
        user_factors : np.ndarray, float32, (n_users, factors)
        item_factors : np.ndarray, float32, (n_items, factors)
            Users or items with no plays get factors that score them 0 against everything
            (zero rows for the ALS backends).

        Raises
        ------
        ValueError
            Bad counts (NaN/inf/zero/negative), with how many and an example.
        FactorizationError
            The backend produced NaN/inf factors.
        """
        m = canonical_csr(user_items_counts, name="user_items_counts")
        check_counts(m.data, what=f"stored counts of the {m.shape[0]}x{m.shape[1]} matrix")
        user_factors, item_factors = self._fit(m)
        return check_factors(user_factors, item_factors, backend=self.name, shape=m.shape, factors=self.factors)

    @abc.abstractmethod
    def _fit(self, user_items_counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """Backend work on a validated, canonical CSR of counts; returns (user, item) factors."""
