"""Fold-in: factors for new rows with the other side fixed (one exact ALS half-step).

For a row u with observed columns i (counts r_ui) and fixed factors Y (n_fixed, f), Hu, Koren &
Volinsky's normal equations are::

    (YᵀY + Yᵀ(C_u − I)Y + λI) x_u = Yᵀ C_u p_u

with C_u = diag(c_u·) and p_u = 1 on the observed columns. Only the observed columns differ from
the shared YᵀY, so it is computed once. Rows are solved in batches: rows are bucketed by their
number of nonzeros (rounded up to a power of two, padded with zero weight), each bucket's
Yᵀ(C_u − I)Y is one batched matmul and the systems are one batched ``np.linalg.solve``.

Uses in the pipeline:

* new items (the cold-start upper bound, new songs with plays) from their plays with the user
  factors fixed — pass ``item_users`` (items × users) and the user factors;
* new or changed users with the item factors fixed — pass ``user_items`` and the item factors.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from deepcontent.interactions.weighting import canonical_csr, confidence_matrix

__all__ = ["fold_in", "solve_rows"]

_BATCH_VALUES = 1 << 22  # float64 values per batch for the gathered factors and the systems (~32 MB)


def solve_rows(
    target_confidence: sp.csr_matrix,
    fixed_factors: np.ndarray,
    *,
    regularization: float,
) -> np.ndarray:
    """Exact weighted least squares per row of a confidence matrix (float64).

    Parameters
    ----------
    target_confidence : csr_matrix, (n_rows, n_fixed)
        c on the observed pairs of each row to solve (p = 1 there; c = 1, p = 0 elsewhere).
    fixed_factors : np.ndarray, (n_fixed, f)
        The other side's factors, held fixed.
    regularization : float
        λ >= 0.

    Returns
    -------
    np.ndarray, float64, (n_rows, f)
        Rows with no observed pair are zero (the minimiser of Σ_i (0 − xᵀy_i)² + λ‖x‖²).

    Raises
    ------
    ValueError
        A system is singular (only possible with λ = 0 and rank-deficient fixed factors).
    """
    conf = canonical_csr(target_confidence, name="target_confidence")
    Y = np.asarray(fixed_factors, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[0] != conf.shape[1]:
        raise ValueError(
            f"fixed_factors must be ({conf.shape[1]}, f) to match a matrix with {conf.shape[1]} columns, "
            f"got {Y.shape}"
        )
    if not (np.isfinite(regularization) and regularization >= 0):
        raise ValueError(f"regularization must be a finite number >= 0, got {regularization!r}")
    n_rows, f = conf.shape[0], Y.shape[1]
    out = np.zeros((n_rows, f), dtype=np.float64)
    counts = np.diff(conf.indptr)
    rows = np.flatnonzero(counts)
    if len(rows) == 0:
        return out
    gram = Y.T @ Y + regularization * np.eye(f)
    rhs = np.asarray(conf @ Y)  # Yᵀ C_u p_u for every row: Σ_i c_ui y_i over observed i
    width = 1 << np.ceil(np.log2(counts[rows])).astype(np.int64)  # bucket: next power of two
    for w in np.unique(width):
        bucket = rows[width == w]
        per_batch = max(1, _BATCH_VALUES // int(w * f + f * f))
        offsets = np.arange(w)
        for start in range(0, len(bucket), per_batch):
            r = bucket[start : start + per_batch]
            valid = offsets[None, :] < counts[r][:, None]  # (b, w)
            pos = np.where(valid, conf.indptr[r][:, None] + offsets[None, :], 0)
            G = Y[conf.indices[pos]]  # (b, w, f); padded slots point at some column ...
            weights = np.where(valid, conf.data[pos] - 1.0, 0.0)  # ... with weight 0
            A = gram + np.matmul(G.transpose(0, 2, 1) * weights[:, None, :], G)  # (b, f, f)
            try:
                out[r] = np.linalg.solve(A, rhs[r][..., None])[..., 0]
            except np.linalg.LinAlgError as err:
                raise ValueError(
                    f"singular normal equations for some of rows {int(r[0])}..{int(r[-1])} "
                    f"(regularization={regularization!r}); use regularization > 0"
                ) from err
    return out


def fold_in(
    target_items_counts: sp.csr_matrix,
    fixed_factors: np.ndarray,
    *,
    alpha: float,
    eps: float,
    regularization: float,
) -> np.ndarray:
    """Factors for new rows from their counts, the other side's factors fixed.

    Parameters
    ----------
    target_items_counts : csr_matrix, (n_new, n_fixed)
        Play counts of the rows to solve against the fixed side: ``item_users`` (new items ×
        users) with user factors fixed, or ``user_items`` (new users × items) with item factors
        fixed. Finite and > 0 on the stored entries.
    fixed_factors : np.ndarray, (n_fixed, f)
        The fixed side's factors (e.g. fitted user factors).
    alpha, eps : float
        Confidence c = 1 + alpha·log(1 + r/eps), as in the fit.
    regularization : float
        λ, as in the fit.

    Returns
    -------
    np.ndarray, (n_new, f), dtype of ``fixed_factors`` if floating (else float64)
        Solved in float64. Rows with no interactions are zero vectors.
    """
    conf = confidence_matrix(target_items_counts, alpha=alpha, eps=eps)
    out = solve_rows(conf, fixed_factors, regularization=regularization)
    dtype = np.asarray(fixed_factors).dtype
    return out.astype(dtype if dtype.kind == "f" else np.float64, copy=False)
