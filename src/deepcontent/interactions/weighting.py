"""Confidence weighting of play counts for weighted matrix factorisation (WMF).

Hu, Koren & Volinsky (2008) as used by van den Oord et al. (thesis §4.4, Eqs. 4.1–4.2)::

    p_ui = 1 if r_ui > 0 else 0
    c_ui = 1 + alpha * log(1 + r_ui / eps)

Only *observed* pairs carry a count; every unobserved pair has p_ui = 0 and c_ui = 1 by
definition, so a sparse users × items matrix of counts is all that is ever stored. The functions
here therefore take the observed counts (the ``.data`` of a CSR) and refuse counts that are not
finite and strictly positive: the matrices job quarantines such records before they get here,
and this is the guard that keeps a bad value from silently turning into a NaN factor.

Backends map these onto their own conventions:

* benfred/implicit ≥ 0.5 reads the stored value as c_ui itself (it adds ``(value - 1) y yᵀ`` to
  YᵀY and ``value · y`` to the right-hand side) — feed it :func:`confidence_matrix` with its own
  ``alpha`` left at 1.
* Spark MLlib ``ALS(implicitPrefs=True, alpha=a)`` uses c = 1 + a·r′ for a rating r′ — feed it
  r′ = :func:`log_ratings` (``log(1 + r/eps)``) and ``alpha=alpha``: then
  1 + alpha·r′ = c_ui exactly, and p = I(r′ > 0) = I(r > 0).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["canonical_csr", "check_counts", "confidence", "confidence_matrix", "log_ratings", "log_rating_matrix"]


def _check_params(*, alpha: float | None = None, eps: float) -> None:
    if alpha is not None and not (np.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not (np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def check_counts(counts: np.ndarray, *, what: str = "counts") -> None:
    """Raise ``ValueError`` unless every value of ``counts`` is finite and > 0.

    The message says how many values are bad, of which kinds, and shows one of them.

    Parameters
    ----------
    counts : np.ndarray, any shape
        Observed play counts (e.g. the ``.data`` of a users × items CSR).
    what : str
        What the values are, for the message.
    """
    values = np.asarray(counts)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numeric, got dtype {values.dtype}")
    if values.dtype.kind == "f":
        bad = ~(np.isfinite(values) & (values > 0))
    else:
        bad = values <= 0
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        flat = values.ravel()
        bad_flat = bad.ravel()
        kinds = []
        with np.errstate(invalid="ignore"):
            for name, mask in (
                ("NaN", np.isnan(flat) if flat.dtype.kind == "f" else np.zeros_like(bad_flat)),
                ("inf", np.isinf(flat) if flat.dtype.kind == "f" else np.zeros_like(bad_flat)),
                ("negative", flat < 0),
                ("zero", flat == 0),
            ):
                k = int(np.count_nonzero(mask))
                if k:
                    kinds.append(f"{k} {name}")
        first = int(np.flatnonzero(bad_flat)[0])
        raise ValueError(
            f"{n_bad} of {values.size} {what} are not finite and > 0 ({', '.join(kinds)}); "
            f"e.g. {flat[first].item()!r} at flat index {first}"
        )


def log_ratings(counts: np.ndarray, *, eps: float) -> np.ndarray:
    """r′ = log(1 + r / eps), elementwise; the rating to give Spark MLlib's implicit ALS.

    Spark's ``ALS(implicitPrefs=True, alpha=alpha)`` weights an observed rating r′ by
    1 + alpha·r′, so with r′ = log(1 + r/eps) its confidence is exactly
    c = 1 + alpha·log(1 + r/eps) and its data term equals ours.

    Parameters
    ----------
    counts : np.ndarray, any shape
        Observed play counts, finite and > 0.
    eps : float
        Count scale, > 0.

    Returns
    -------
    np.ndarray, same shape as ``counts``, float64, all > 0.
    """
    _check_params(eps=eps)
    check_counts(counts)
    return np.log1p(np.asarray(counts, dtype=np.float64) / eps)


def confidence(counts: np.ndarray, *, alpha: float, eps: float) -> np.ndarray:
    """c = 1 + alpha · log(1 + r / eps), elementwise (thesis Eq. 4.2).

    Parameters
    ----------
    counts : np.ndarray, any shape
        Observed play counts, finite and > 0. (An unobserved pair has c = 1 by definition; it is
        never passed here.)
    alpha : float
        Confidence scale, >= 0.
    eps : float
        Count scale, > 0.

    Returns
    -------
    np.ndarray, same shape as ``counts``, float64, all >= 1.
    """
    _check_params(alpha=alpha, eps=eps)
    return 1.0 + alpha * log_ratings(counts, eps=eps)


def canonical_csr(user_items, *, name: str = "user_items") -> sp.csr_matrix:
    """``user_items`` as a ``csr_matrix`` with sorted indices and no duplicates (summed).

    Copies only when a conversion or a clean-up is needed; raises ``TypeError`` for a dense input.
    """
    if not sp.issparse(user_items):
        raise TypeError(f"{name} must be a scipy.sparse matrix (CSR), got {type(user_items).__name__}")
    m = sp.csr_matrix(user_items)  # copies only when not CSR already
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    return m


def _with_data(user_items: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix((data, user_items.indices.copy(), user_items.indptr.copy()), shape=user_items.shape)


def confidence_matrix(user_items, *, alpha: float, eps: float, dtype=np.float64) -> sp.csr_matrix:
    """c_ui on the nonzeros of a counts matrix, same sparsity.

    Parameters
    ----------
    user_items : scipy.sparse matrix, (n_users, n_items)
        Play counts (CSR; other formats are converted, duplicates summed). Every stored value
        must be finite and > 0 — explicit zeros included, so an all-zero stored entry is an error
        rather than a silent "played" flag.
    alpha, eps : float
        As in :func:`confidence`.
    dtype : numpy dtype
        Of the returned values.

    Returns
    -------
    scipy.sparse.csr_matrix, (n_users, n_items)
        c_ui on the observed pairs, nothing elsewhere (which means c = 1, p = 0 there).
    """
    m = canonical_csr(user_items)
    check_counts(m.data, what=f"stored counts of the {m.shape[0]}x{m.shape[1]} matrix")
    return _with_data(m, confidence(m.data, alpha=alpha, eps=eps).astype(dtype, copy=False))


def log_rating_matrix(user_items, *, eps: float, dtype=np.float64) -> sp.csr_matrix:
    """r′ = log(1 + r/eps) on the nonzeros of a counts matrix, same sparsity (see
    :func:`log_ratings`)."""
    m = canonical_csr(user_items)
    check_counts(m.data, what=f"stored counts of the {m.shape[0]}x{m.shape[1]} matrix")
    return _with_data(m, log_ratings(m.data, eps=eps).astype(dtype, copy=False))
