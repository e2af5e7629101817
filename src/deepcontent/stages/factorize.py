"""Stage ``factorize``: the matrices stage's CSR exports -> WMF latent factors.

It fits each matrix of ``factorize.matrices`` (both by default):

``plays`` (listening factors, the CNN's regression targets)
    WMF on users × **train** songs only (``user_items_train.npz``); valid songs are then folded
    in from their own plays with the user factors fixed, so they can serve as validation
    targets. Test songs get no factors here: their plays are left for the evaluation's upper
    bound, so none of them reaches factorisation or training. Publishes
    ``factors/plays/item_factors`` (song_id, factors, split, run_id) and
    ``factors/plays/user_factors`` (user_id, factors, run_id), and upserts the warehouse's
    ``item_factors`` / ``user_factors`` tables.

``tags`` (tag factors, the ISMIR 2014 source task)
    The same on songs × tags (``item_tags_train.npz``): song factors for train songs, valid
    songs folded in with the tag factors fixed; ``factorize.tag_factors`` gives it a size of
    its own. Publishes ``factors/tags/item_factors`` and ``factors/tags/tag_factors``. Skipped,
    with a line saying so, when the catalog has no tags.

Rows without any interaction in the fitted matrix are not published (their factors carry no
information). Non-finite factors abort the run before anything is written. Re-running with the
same exports and config publishes nothing. The maths is in :mod:`deepcontent.factorize`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.compute as pc
import scipy.sparse as sp

from deepcontent import datasets
from deepcontent.config import Config
from deepcontent.datasets import ITEM_INDEX, SPLITS, TAG_INDEX, USER_INDEX, csr_exports, factors_table, load_csr
from deepcontent.factorize.factory import make_factorizer
from deepcontent.factorize.foldin import fold_in
from deepcontent.manifest import log
from deepcontent.stages.base import StageContext, StageResult, StageRun
from deepcontent.storage import Storage

__all__ = ["STAGE", "factors_by_index", "run"]

STAGE = "factorize"
#: The exports each matrix is fitted on, and the dataset of its "other side" factors.
_MATRIX = {"plays": ("user_items", "user_factors", USER_INDEX, "user_id"),
           "tags": ("item_tags", "tag_factors", TAG_INDEX, "tag")}


def factors_by_index(storage: Storage, factors: datasets.Dataset, index: datasets.Dataset, *, id_column: str,
                     n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A published factors dataset laid out by its id map: ``(factors (n_rows, f) float32, has
    (n_rows,) bool)``, row i = the id whose index is i; ids without factors (e.g. users with no
    train plays) get a zero row and ``has[i] = False``.

    ``factors`` e.g. ``datasets.factors("plays", "user_factors")``, ``index`` the id map
    (``USER_INDEX`` / ``TAG_INDEX``) keyed by ``id_column``; ``n_rows`` is the matrices' size on
    that side."""
    table = factors.read(storage)
    ids = index.read(storage)
    rows = pc.take(ids["idx"], pc.index_in(table[id_column], value_set=ids[id_column]))
    rows = rows.to_numpy(zero_copy_only=False).astype(np.int64)
    f = datasets.vectors(table["factors"])
    out = np.zeros((n_rows, f.shape[1]), np.float32)
    out[rows] = f
    has = np.zeros(n_rows, bool)
    has[rows] = True
    return out, has


def _ids_by_index(storage: Storage, index: datasets.Dataset, id_column: str) -> np.ndarray:
    t = index.read(storage)
    out = np.empty(t.num_rows, dtype=object)
    out[t["idx"].to_numpy()] = np.asarray(t[id_column].to_pylist(), dtype=object)
    return out


def run(cfg: Config, ctx: StageContext) -> StageResult:
    """Fit every matrix of ``factorize.matrices``; see the module docstring.

    The result's counts are the listening fit's (``train_items``, ``valid_items``, ``user_ids``,
    ``nnz_train``), the tag fit's prefixed with ``tags_``."""
    storage = ctx.storage
    datasets.require_plays(storage, needed_by="factorize")
    files = csr_exports(storage, needed_by="factorize")
    exports_run = datasets.EXPORTS.run_id(storage)
    results: dict[str, StageResult] = {}
    for matrix in cfg.factorize.matrices:
        if matrix == "tags" and load_csr(storage, files["item_tags_train.npz"]).nnz == 0:
            log.info("factorize: the catalog has no tags on train songs; no tag factors")
            continue
        results[matrix] = _fit_matrix(cfg, ctx, matrix, files=files, exports_run=exports_run)
    if not results:
        return StageResult("factorize-nothing", False, {}, {}, {}, None, {"fits": {}})
    main = results.get("plays") or next(iter(results.values()))
    counts: dict = {}
    outputs: dict = {}
    for matrix, r in results.items():
        counts.update({(k if matrix == "plays" else f"tags_{k}"): v for k, v in r.counts.items()})
        outputs.update({f"{matrix}/{k}": v for k, v in r.outputs.items()})
    return StageResult(main.run_id, any(r.published for r in results.values()), counts, {}, outputs, main.manifest_uri,
                       {"fits": {m: {"run_id": r.run_id, "published": r.published, "manifest": r.manifest_uri}
                                 for m, r in results.items()}})


def _fit_matrix(cfg: Config, ctx: StageContext, matrix: str, *, files: dict[str, str], exports_run: str) -> StageResult:
    """One WMF fit + fold-in of the valid songs, published as its two factors datasets."""
    storage, fc = ctx.storage, cfg.factorize
    prefix, other_kind, other_index, other_col = _MATRIX[matrix]
    items_ds, others_ds = datasets.factors(matrix, "item_factors"), datasets.factors(matrix, other_kind)
    outputs = {"item_factors": items_ds.uri(storage), other_kind: others_ds.uri(storage)}
    n_factors = fc.tag_factors if matrix == "tags" and fc.tag_factors else fc.factors
    # what decides this fit: the other matrix's settings do not
    skip = {"matrices"} | ({"tag_factors"} if matrix == "plays" else set())
    fit_config = {k: v for k, v in fc.model_dump(mode="json").items() if k not in skip}
    fingerprint = hashlib.sha256(json.dumps([exports_run, matrix, fit_config], sort_keys=True).encode()).hexdigest()[:24]
    with StageRun(STAGE, cfg, storage) as run:
        done = run.previous(fingerprint, scope=matrix, warehouse=ctx.warehouse if matrix == "plays" else None)
        if done is not None:
            log.info("factorize: %s factors are up to date (run %s); nothing to do", matrix, done["run_id"])
            return run.unchanged(done["run_id"], outputs=outputs)
        run.manifest.inputs = {"matrices": exports_run, "fingerprint": fingerprint, "matrix": matrix}
        with run.timed("load"):
            train = load_csr(storage, files[f"{prefix}_train.npz"])
            valid = load_csr(storage, files[f"{prefix}_valid.npz"])
        params = dict(factors=n_factors, alpha=fc.alpha, eps=fc.eps, regularization=fc.regularization,
                      iterations=fc.iterations, seed=fc.seed)
        if fc.backend == "implicit":
            params["num_threads"] = fc.num_threads
        if fc.backend == "spark":
            params["spark"] = ctx.spark
        log.info("factorize: %s backend on %s matrix %d × %d (nnz %d), %d factors, %d iterations", fc.backend, matrix,
                 train.shape[0], train.shape[1], train.nnz, n_factors, fc.iterations)
        with run.timed("fit"):
            row_factors, col_factors = make_factorizer(fc.backend, **params).fit(train)

        with run.timed("fold_in"):
            item_ids = _ids_by_index(storage, ITEM_INDEX, "song_id")
            split_tbl = SPLITS.read(storage)
            split_of = dict(zip(split_tbl["song_id"].to_pylist(), split_tbl["split"].to_pylist()))
            if matrix == "plays":
                # items are columns: train items from the fit, valid items folded in from their plays
                item_train, other_factors = col_factors, row_factors
                has_train = np.diff(train.tocsc().indptr) > 0
                valid_items = sp.csr_matrix(valid.T)
                other_has = np.diff(train.indptr) > 0
            else:
                # songs are rows of the song × tag matrix
                item_train, other_factors = row_factors, col_factors
                has_train = np.diff(train.indptr) > 0
                valid_items = valid
                other_has = np.diff(train.tocsc().indptr) > 0
            has_valid = np.diff(valid_items.indptr) > 0
            item_valid = fold_in(valid_items, other_factors, alpha=fc.alpha, eps=fc.eps, regularization=fc.regularization)
            if not np.isfinite(item_valid).all():
                bad = int((~np.isfinite(item_valid)).any(axis=1).sum())
                raise FloatingPointError(f"fold-in of valid songs produced non-finite factors in {bad} rows; "
                                         f"try a larger factorize.regularization (now {fc.regularization})")
            is_train = np.array([split_of.get(s) == "train" for s in item_ids])
            is_valid = np.array([split_of.get(s) == "valid" for s in item_ids])
            pick_train = np.flatnonzero(is_train & has_train)
            pick_valid = np.flatnonzero(is_valid & has_valid)
            items = factors_table(
                list(item_ids[pick_train]) + list(item_ids[pick_valid]),
                np.vstack([item_train[pick_train], item_valid[pick_valid]]) if len(pick_train) + len(pick_valid)
                else np.zeros((0, n_factors), np.float32),
                id_column="song_id", run_id=run.run_id, split=["train"] * len(pick_train) + ["valid"] * len(pick_valid))
            other_ids = _ids_by_index(storage, other_index, other_col)
            pick_other = np.flatnonzero(other_has)
            others = factors_table(list(other_ids[pick_other]), other_factors[pick_other], id_column=other_col,
                                   run_id=run.run_id)

        with run.timed("publish"):
            meta = {"input_fingerprint": fingerprint, "matrix": matrix, "backend": fc.backend}
            for dataset, table in ((items_ds, items), (others_ds, others)):
                run.publish(dataset, [run.write_part(dataset, table)], meta=meta)
            if matrix == "plays":
                wh = ctx.warehouse
                wh.ensure_tables(["item_factors", "user_factors"])
                run.committed("item_factors", wh.upsert("item_factors", items, run_id=run.run_id))
                run.committed("user_factors", wh.upsert("user_factors", others, run_id=run.run_id))
        counts = {"train_items": len(pick_train), "valid_items": len(pick_valid), f"{other_col}s": len(pick_other),
                  "nnz_train": int(train.nnz)}
        log.info("factorize: %s factors for %d train + %d valid songs and %d %ss", matrix, len(pick_train),
                 len(pick_valid), len(pick_other), other_col)
        return run.succeed(counts=counts, outputs=outputs, matrix=matrix, fingerprint=fingerprint, scope=matrix)
