"""A small, clear numpy ALS for WMF: the oracle the fast backends are tested against.

Hu, Koren & Volinsky (2008), exact solve per row, float64, one Python loop per row — slow by
design (use it on matrices of a few thousand rows), easy to read and check::

    x_u = (YᵀY + Yᵀ(C_u − I)Y + λI)⁻¹ Yᵀ C_u p_u        for every user, then
    y_i = (XᵀX + Xᵀ(C_i − I)X + λI)⁻¹ Xᵀ C_i p_i        for every item, ``iterations`` times.

It shares nothing with the vectorised fold-in (:mod:`deepcontent.factorize.foldin`) beyond the
confidence weighting, so the two check each other.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from deepcontent.factorize.base import Factorizer, _check_nonnegative, _check_positive_int
from deepcontent.interactions.weighting import confidence_matrix

__all__ = ["ReferenceFactorizer", "als_half_step_reference", "als_reference"]


def als_half_step_reference(
    target_confidence: sp.csr_matrix,
    fixed_factors: np.ndarray,
    *,
    regularization: float,
) -> np.ndarray:
    """Solve every row of ``target_confidence`` against ``fixed_factors`` (one row at a time).

    Parameters
    ----------
    target_confidence : csr_matrix, (n_rows, n_fixed)
        c_ui on the observed pairs (p = 1 there; c = 1, p = 0 elsewhere).
    fixed_factors : np.ndarray, (n_fixed, f)
    regularization : float
        λ.

    Returns
    -------
    np.ndarray, float64, (n_rows, f); rows without observed pairs are zero.
    """
    Y = np.asarray(fixed_factors, dtype=np.float64)
    f = Y.shape[1]
    YtY = Y.T @ Y
    out = np.zeros((target_confidence.shape[0], f))
    indptr, indices, data = target_confidence.indptr, target_confidence.indices, target_confidence.data
    for u in range(target_confidence.shape[0]):
        cols = indices[indptr[u] : indptr[u + 1]]
        if len(cols) == 0:
            continue  # x_u = 0 minimises Σ_i (0 − x_uᵀy_i)² + λ‖x_u‖²
        c = data[indptr[u] : indptr[u + 1]].astype(np.float64)
        Yu = Y[cols]
        A = YtY + Yu.T @ ((c - 1.0)[:, None] * Yu) + regularization * np.eye(f)
        b = Yu.T @ c  # Yᵀ C_u p_u with p = 1 on the observed columns
        out[u] = np.linalg.solve(A, b)
    return out


def als_reference(
    user_items_counts: sp.csr_matrix,
    *,
    factors: int,
    alpha: float,
    eps: float,
    regularization: float,
    iterations: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference WMF by exact alternating least squares.

    Parameters
    ----------
    user_items_counts : csr_matrix, (n_users, n_items)
        Play counts (finite, > 0 on the stored entries).
    factors : int
        Rank f.
    alpha, eps : float
        Confidence c = 1 + alpha·log(1 + r/eps).
    regularization : float
        λ.
    iterations : int
        Sweeps (users then items).
    seed : int
        Seeds the initial item factors, N(0, 0.01²) (user factors are solved first, so their
        start does not matter).

    Returns
    -------
    user_factors : np.ndarray, float64, (n_users, f)
    item_factors : np.ndarray, float64, (n_items, f)
    """
    factors = _check_positive_int("factors", factors)
    iterations = _check_positive_int("iterations", iterations)
    regularization = _check_nonnegative("regularization", regularization)
    user_items = confidence_matrix(user_items_counts, alpha=alpha, eps=eps)
    item_users = user_items.T.tocsr()
    rng = np.random.default_rng(seed)
    item_factors = rng.normal(0.0, 0.01, size=(user_items.shape[1], factors))
    user_factors = np.zeros((user_items.shape[0], factors))
    for _ in range(iterations):
        user_factors = als_half_step_reference(user_items, item_factors, regularization=regularization)
        item_factors = als_half_step_reference(item_users, user_factors, regularization=regularization)
    return user_factors, item_factors


class ReferenceFactorizer(Factorizer):
    """Backend ``"reference"``: :func:`als_reference` (numpy, float64, single-threaded, slow)."""

    name = "reference"

    def _fit(self, user_items_counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        return als_reference(
            user_items_counts,
            factors=self.factors,
            alpha=self.alpha,
            eps=self.eps,
            regularization=self.regularization,
            iterations=self.iterations,
            seed=self.seed,
        )
