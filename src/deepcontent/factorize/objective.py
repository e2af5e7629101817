"""The WMF objective, computed independently of any solver (thesis Eq. 4.3)::

    L(X, Y) = Σ_{u,i} c_ui (p_ui − x_uᵀ y_i)² + λ (Σ_u ‖x_u‖² + Σ_i ‖y_i‖²)

over **all** user–item pairs, with p and c from :mod:`deepcontent.interactions.weighting`.
It never forms the dense users × items matrix. With s_ui = x_uᵀ y_i, unobserved pairs have
c = 1 and p = 0, so

    Σ_all c (p − s)² = Σ_all s² + Σ_observed [c (1 − s)² − s²]

and Σ_all s² = ‖X Yᵀ‖_F² = trace((XᵀX)(YᵀY)) costs O((U + I) f²). The correction runs over the
nonzeros in chunks, so memory stays bounded for Taste-Profile-size matrices.

This is the yardstick the backends are compared with (the reference ALS, benfred/implicit and
Spark MLlib all claim to minimise it, up to Spark's per-row regularisation scaling).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from deepcontent.interactions.weighting import confidence_matrix

__all__ = ["observed_scores", "wmf_objective", "wmf_objective_from_confidence"]

_CHUNK_VALUES = 1 << 22  # gathered factor values per chunk of nonzeros (~32 MB in float64)


def _check_factors_shape(shape: tuple[int, int], user_factors: np.ndarray, item_factors: np.ndarray) -> None:
    if user_factors.ndim != 2 or item_factors.ndim != 2:
        raise ValueError(
            f"factors must be 2-d, got user_factors {user_factors.shape} and item_factors {item_factors.shape}"
        )
    if user_factors.shape[1] != item_factors.shape[1]:
        raise ValueError(
            f"user and item factors differ in rank: {user_factors.shape[1]} vs {item_factors.shape[1]}"
        )
    if (user_factors.shape[0], item_factors.shape[0]) != tuple(shape):
        raise ValueError(
            f"matrix is {shape[0]} users x {shape[1]} items but factors are for "
            f"{user_factors.shape[0]} users and {item_factors.shape[0]} items"
        )


def observed_scores(user_items: sp.csr_matrix, user_factors: np.ndarray, item_factors: np.ndarray) -> np.ndarray:
    """s_ui = x_uᵀ y_i on the stored entries of ``user_items`` (CSR order), float64.

    Parameters
    ----------
    user_items : csr_matrix, (n_users, n_items)
    user_factors : (n_users, f)
    item_factors : (n_items, f)

    Returns
    -------
    np.ndarray, (nnz,)
    """
    rows = np.repeat(np.arange(user_items.shape[0]), np.diff(user_items.indptr))
    cols = user_items.indices
    f = user_factors.shape[1]
    out = np.empty(len(cols), dtype=np.float64)
    step = max(1, _CHUNK_VALUES // max(f, 1))
    for start in range(0, len(cols), step):
        sl = slice(start, start + step)
        out[sl] = np.einsum(
            "ij,ij->i",
            user_factors[rows[sl]].astype(np.float64, copy=False),
            item_factors[cols[sl]].astype(np.float64, copy=False),
        )
    return out


def wmf_objective_from_confidence(
    user_items_confidence: sp.csr_matrix,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    *,
    regularization: float,
) -> float:
    """The WMF objective given c_ui on the observed pairs (p_ui = 1 there, c = 1 elsewhere).

    Parameters
    ----------
    user_items_confidence : csr_matrix, (n_users, n_items)
        Confidences c_ui on the observed pairs (e.g. from ``confidence_matrix``).
    user_factors : np.ndarray, (n_users, f)
    item_factors : np.ndarray, (n_items, f)
    regularization : float
        λ, the same for every row (no per-row scaling).

    Returns
    -------
    float
    """
    conf = sp.csr_matrix(user_items_confidence)
    X = np.asarray(user_factors)
    Y = np.asarray(item_factors)
    _check_factors_shape(conf.shape, X, Y)
    if not (np.isfinite(regularization) and regularization >= 0):
        raise ValueError(f"regularization must be a finite number >= 0, got {regularization!r}")
    X64 = X.astype(np.float64, copy=False)
    Y64 = Y.astype(np.float64, copy=False)
    gram_total = float(np.sum((X64.T @ X64) * (Y64.T @ Y64)))  # = trace((XᵀX)(YᵀY)) = Σ_all s²
    s = observed_scores(conf, X64, Y64)
    c = conf.data.astype(np.float64, copy=False)
    correction = float(np.sum(c * (1.0 - s) ** 2 - s**2))
    penalty = regularization * (float(np.sum(X64**2)) + float(np.sum(Y64**2)))
    return gram_total + correction + penalty


def wmf_objective(
    user_items_counts: sp.csr_matrix,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    *,
    alpha: float,
    eps: float,
    regularization: float,
) -> float:
    """Σ_ui c_ui (p_ui − x_uᵀy_i)² + λ(Σ‖x_u‖² + Σ‖y_i‖²) over all user–item pairs.

    Parameters
    ----------
    user_items_counts : csr_matrix, (n_users, n_items)
        Play counts on the observed pairs (finite, > 0).
    user_factors : np.ndarray, (n_users, f)
    item_factors : np.ndarray, (n_items, f)
    alpha, eps : float
        Confidence c = 1 + alpha·log(1 + r/eps).
    regularization : float
        λ (plain, not scaled by row counts).

    Returns
    -------
    float
        The objective, accumulated in float64.
    """
    conf = confidence_matrix(user_items_counts, alpha=alpha, eps=eps)
    return wmf_objective_from_confidence(conf, user_factors, item_factors, regularization=regularization)
