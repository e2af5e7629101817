"""Backend ``"spark"``: Spark MLlib ``ALS(implicitPrefs=True)``, for matrices beyond one machine.

How MLlib's objective maps onto ours (Spark's ``ml/recommendation/ALS.scala``,
``computeFactors``)::

    c1 = alpha * |rating|                      # confidence − 1
    ls.add(y_i, rating > 0 ? 1 + c1 : 0, c1)   # A += c1 y yᵀ, b += (1 + c1) y
    solve(A + YᵀY, b, lambda = regParam * numExplicits)

* **Confidence: identical.** We rate each observed pair r′ = log(1 + r/eps)
  (:func:`~deepcontent.interactions.weighting.log_ratings`) and pass ``alpha=alpha``, so
  MLlib's c = 1 + alpha·r′ = 1 + alpha·log(1 + r/eps) = our c_ui, and p = I(r′ > 0) = I(r > 0).
* **Regularisation: not identical.** MLlib scales λ per row by the row's number of ratings
  n_u (ALS-WR, Zhou et al. 2008): it minimises
  Σ c (p − s)² + regParam·(Σ_u n_u‖x_u‖² + Σ_i n_i‖y_i‖²). No single regParam makes that equal
  to our λ(Σ‖x_u‖² + Σ‖y_i‖²) unless every row has the same count. We use
  regParam = λ / n̄ with n̄ = 2·nnz / (active users + active items), the mean number of ratings
  per row over both sides, so that the total penalty weight Σ_rows regParam·n_row equals
  λ·(number of rows): rows of average activity are regularised as in our objective, busier rows
  more, sparser rows less. Pass ``reg_param=`` to set MLlib's value directly. The acceptance for
  this backend is therefore ranking quality (held-out AUC close to the implicit backend's), not
  the objective value.
* Factors are float32 in MLlib, solved by Cholesky in double precision.

Users/items with no ratings do not appear in MLlib's factor tables: they get zero rows.

Lineage: each ALS sweep adds several RDDs to the lineage, and serialising a task of a 15-sweep
lineage overflows the JVM stack (``StackOverflowError`` in task serialisation, seen with Spark
4.3 on a local session at maxIter=15). MLlib truncates it by checkpointing every
``checkpointInterval`` sweeps, but only when the SparkContext has a checkpoint directory. So the
backend makes sure one is set: ``checkpoint_dir=`` if given (on a cluster: a path every executor
can reach), else the session's own, else — for a ``local`` master only — a temporary directory
removed at exit. A cluster session without one is refused rather than left to overflow.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import numpy as np
import scipy.sparse as sp

from deepcontent.factorize.base import Factorizer, _check_nonnegative, _check_positive_int
from deepcontent.interactions.weighting import log_ratings

__all__ = ["SparkFactorizer", "spark_reg_param"]


def spark_reg_param(user_items_counts: sp.csr_matrix, *, regularization: float) -> float:
    """MLlib ``regParam`` for our λ: λ / (mean number of ratings per active row, both sides).

    Parameters
    ----------
    user_items_counts : csr_matrix, (n_users, n_items)
    regularization : float
        Our λ.
    """
    m = sp.csr_matrix(user_items_counts)
    if m.nnz == 0:
        return float(regularization)
    active_users = int(np.count_nonzero(np.diff(m.indptr)))
    active_items = int(np.count_nonzero(np.bincount(m.indices, minlength=m.shape[1])))
    mean_count = 2.0 * m.nnz / (active_users + active_items)
    return float(regularization) / mean_count


def _collect_factors(factors_df, *, n: int, rank: int) -> np.ndarray:
    """MLlib's (id int, features array<float>) table → dense (n, rank) float32, zeros for absent ids."""
    table = factors_df.toArrow()
    out = np.zeros((n, rank), dtype=np.float32)
    if table.num_rows == 0:
        return out
    ids = table.column("id").to_numpy()
    values = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    out[ids] = values.reshape(table.num_rows, rank)
    return out


class SparkFactorizer(Factorizer):
    """WMF with Spark MLlib's implicit ALS.

    Parameters
    ----------
    spark : pyspark.sql.SparkSession
        The session to run on (``deepcontent.engines.spark.spark_session``).
    reg_param : float or None
        MLlib's ``regParam`` as is; None derives it from ``regularization`` with
        :func:`spark_reg_param`.
    num_blocks : int or None
        ``numUserBlocks`` = ``numItemBlocks``; None = the session's default parallelism.
    checkpoint_dir : str or None
        Checkpoint directory to set on the SparkContext (see the module docstring).
    checkpoint_interval : int
        MLlib's ``checkpointInterval`` (sweeps between checkpoints).
    **common
        ``factors, alpha, eps, regularization, iterations, seed`` (see :class:`Factorizer`).
    """

    name = "spark"

    def __init__(
        self,
        *,
        spark,
        reg_param: float | None = None,
        num_blocks: int | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_interval: int = 5,
        **common,
    ) -> None:
        super().__init__(**common)
        if spark is None:
            raise ValueError("the spark backend needs a SparkSession: make_factorizer('spark', spark=session, ...)")
        self.spark = spark
        self.reg_param = None if reg_param is None else _check_nonnegative("reg_param", reg_param)
        self.num_blocks = None if num_blocks is None else _check_positive_int("num_blocks", num_blocks)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_interval = _check_positive_int("checkpoint_interval", checkpoint_interval)
        self.last_reg_param: float | None = None

    @property
    def params(self) -> dict:
        return {**super().params, "reg_param": self.reg_param, "num_blocks": self.num_blocks,
                "checkpoint_interval": self.checkpoint_interval}

    def _ensure_checkpoint_dir(self) -> None:
        sc = self.spark.sparkContext
        if self.checkpoint_dir:
            sc.setCheckpointDir(self.checkpoint_dir)
        elif sc.getCheckpointDir() is None:
            if not sc.master.startswith("local"):
                if self.iterations > self.checkpoint_interval:
                    raise ValueError(
                        f"the spark backend needs a checkpoint directory on master {sc.master!r} for "
                        f"{self.iterations} iterations (the ALS lineage overflows the stack without one): "
                        f"pass checkpoint_dir= or call sparkContext.setCheckpointDir()"
                    )
                return
            path = tempfile.mkdtemp(prefix="deepcontent-als-checkpoints-")
            atexit.register(shutil.rmtree, path, ignore_errors=True)
            sc.setCheckpointDir(path)

    def ratings_frame(self, user_items_counts: sp.csr_matrix):
        """(user int, item int, rating float = log(1 + r/eps)) for every observed pair."""
        import pyarrow as pa

        coo = user_items_counts.tocoo()
        table = pa.table({
            "user": pa.array(coo.row.astype(np.int32)),
            "item": pa.array(coo.col.astype(np.int32)),
            "rating": pa.array(log_ratings(coo.data, eps=self.eps).astype(np.float32)),
        })
        return self.spark.createDataFrame(table)

    def _fit(self, user_items_counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        from pyspark.ml.recommendation import ALS

        reg_param = self.reg_param
        if reg_param is None:
            reg_param = spark_reg_param(user_items_counts, regularization=self.regularization)
        self.last_reg_param = reg_param
        blocks = self.num_blocks or self.spark.sparkContext.defaultParallelism
        self._ensure_checkpoint_dir()
        als = ALS(
            rank=self.factors, maxIter=self.iterations, regParam=reg_param, alpha=self.alpha,
            implicitPrefs=True, nonnegative=False, seed=self.seed,
            numUserBlocks=blocks, numItemBlocks=blocks, checkpointInterval=self.checkpoint_interval,
            userCol="user", itemCol="item", ratingCol="rating",
        )
        n_users, n_items = user_items_counts.shape
        if user_items_counts.nnz == 0:
            return np.zeros((n_users, self.factors), np.float32), np.zeros((n_items, self.factors), np.float32)
        model = als.fit(self.ratings_frame(user_items_counts))
        user_factors = _collect_factors(model.userFactors, n=n_users, rank=self.factors)
        item_factors = _collect_factors(model.itemFactors, n=n_items, rank=self.factors)
        return user_factors, item_factors
