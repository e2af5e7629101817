"""Backend ``"implicit"``: benfred/implicit's ``AlternatingLeastSquares`` (CPU, or GPU when built).

How implicit's objective maps onto ours (checked against implicit 0.7.3's source and
empirically: ``tests/factorize/test_backends.py``, ``TestImplicitBackend``
``test_half_step_is_our_normal_equations`` and ``test_objective_within_2_percent_of_reference``):

* ``fit(user_items)`` reads each stored value v as the confidence itself: its solvers
  (``implicit/cpu/_als.pyx``: ``_least_squares`` and ``_least_squares_cg``) build
  A = YᵀY + λI + Σ_i (v_ui − 1) y_i y_iᵀ and b = Σ_i v_ui y_i (p = 1 where v > 0; unstored
  pairs are c = 1, p = 0). That is exactly our normal equations with v = c_ui, so we pass
  :func:`~deepcontent.interactions.weighting.confidence_matrix` (c_ui, not c_ui − 1).
* implicit's own ``alpha`` multiplies every stored value (``Cui = alpha * Cui``) — it would
  scale c, "1 +" included — so it is left at 1.0; our alpha lives inside c.
* λ is added as plain λI to every row's system (no scaling by the row's number of nonzeros,
  unlike Spark's ALS-WR), so ``regularization`` passes through unchanged.
* The CG solver (``use_cg=True``, default, ``cg_steps`` = 3 warm-started steps per sweep)
  approximately solves the same systems; ``use_cg=False`` is the exact Cholesky solve.

Hence implicit minimises exactly :func:`~deepcontent.factorize.objective.wmf_objective`
(in float32). The GPU model is chosen here, and only here, when ``implicit.gpu.HAS_CUDA``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from deepcontent.factorize.base import Factorizer, _check_positive_int
from deepcontent.interactions.weighting import confidence_matrix

__all__ = ["ImplicitFactorizer"]


def gpu_available() -> bool:
    """Whether implicit was built with CUDA and can see a GPU (and RMM is installed)."""
    try:
        import implicit.gpu
    except ImportError:  # pragma: no cover - implicit is a dependency
        return False
    return bool(implicit.gpu.HAS_CUDA)


class ImplicitFactorizer(Factorizer):
    """WMF with benfred/implicit.

    Parameters
    ----------
    num_threads : int
        CPU threads for the solver (0 = all cores). Ignored on GPU.
    use_cg : bool
        Conjugate-gradient solver (fast, approximate per sweep) instead of the exact Cholesky
        solve. The GPU model always uses CG.
    cg_steps : int
        CG steps per row per sweep.
    use_gpu : bool or None
        None: the GPU model when ``implicit.gpu.HAS_CUDA``, else CPU.
    **common
        ``factors, alpha, eps, regularization, iterations, seed`` (see :class:`Factorizer`).
    """

    name = "implicit"

    def __init__(
        self,
        *,
        num_threads: int = 0,
        use_cg: bool = True,
        cg_steps: int = 3,
        use_gpu: bool | None = None,
        **common,
    ) -> None:
        super().__init__(**common)
        if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 0:
            raise ValueError(f"num_threads must be an integer >= 0 (0 = all cores), got {num_threads!r}")
        self.num_threads = int(num_threads)
        self.use_cg = bool(use_cg)
        self.cg_steps = _check_positive_int("cg_steps", cg_steps)
        self.use_gpu = gpu_available() if use_gpu is None else bool(use_gpu)

    @property
    def params(self) -> dict:
        return {**super().params, "num_threads": self.num_threads, "use_cg": self.use_cg,
                "cg_steps": self.cg_steps, "use_gpu": self.use_gpu}

    def _model(self):
        if self.use_gpu:
            from implicit.gpu.als import AlternatingLeastSquares

            model = AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, alpha=1.0, dtype=np.float32,
                iterations=self.iterations, random_state=self.seed,
            )
        else:
            from implicit.cpu.als import AlternatingLeastSquares

            model = AlternatingLeastSquares(
                factors=self.factors, regularization=self.regularization, alpha=1.0, dtype=np.float32,
                use_native=True, use_cg=self.use_cg, iterations=self.iterations,
                num_threads=self.num_threads, random_state=self.seed,
            )
        model.cg_steps = self.cg_steps
        return model

    def _fit(self, user_items_counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        from implicit.recommender_base import ModelFitError
        from threadpoolctl import threadpool_limits

        with np.errstate(over="ignore"):  # an overflow is reported just below, with the values
            user_items = confidence_matrix(user_items_counts, alpha=self.alpha, eps=self.eps, dtype=np.float32)
        if not np.isfinite(user_items.data).all():  # implicit solves in float32
            biggest = float(user_items_counts.data.max())
            raise ValueError(
                f"confidences overflow float32 (alpha={self.alpha!r}, eps={self.eps!r}, largest count {biggest!r}); "
                f"use a smaller alpha or a larger eps"
            )
        # implicit parallelises over rows itself; a multi-threaded BLAS underneath costs ~10x
        # (and implicit warns about it when the model is built).
        with threadpool_limits(limits=1, user_api="blas"):
            model = self._model()
            try:
                model.fit(user_items, show_progress=False)
            except ModelFitError:
                pass  # implicit's own NaN check; check_factors reports it with counts
        if self.use_gpu:
            model = model.to_cpu()
        return np.asarray(model.user_factors), np.asarray(model.item_factors)
