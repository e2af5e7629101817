"""Stage ``factorize``: the matrices stage's CSR exports -> WMF latent factors.

``factorize.matrix=plays`` (listening factors, the CNN's regression targets)
    Fits WMF on users × **train** songs only (``user_items_train.npz``); valid songs are then
    folded in from their own plays with the user factors fixed, so they can serve as
    validation targets. Test songs get no factors here: their plays are left for the
    evaluation's upper bound, so none of them reaches factorisation or training.
    Publishes ``factors/plays/item_factors`` (song_id, factors, split, run_id) and
    ``factors/plays/user_factors`` (user_id, factors, run_id), and upserts the warehouse's
    ``item_factors`` / ``user_factors`` tables.

``factorize.matrix=tags`` (tag factors, the ISMIR 2014 source task)
    The same on songs × tags (``item_tags_train.npz``): song factors for train songs, valid
    songs folded in with the tag factors fixed. Publishes ``factors/tags/item_factors`` and
    ``factors/tags/tag_factors``.

Rows without any interaction in the fitted matrix are not published (their factors carry no
information). Non-finite factors abort the run before anything is written. Re-running with the
same exports and config publishes nothing.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from deepcontent.config import Config
from deepcontent.factorize.factory import make_factorizer
from deepcontent.factorize.foldin import fold_in
from deepcontent.manifest import RunManifest, StageResult, log
from deepcontent.matrices import EXPORTS, ITEM_INDEX, SPLITS, TAG_INDEX, USER_INDEX, export_files, load_csr
from deepcontent.storage import Storage, join, new_run_id

STAGE = "factorize"


def factors_dataset(matrix: str, kind: str) -> str:
    """``factors/<matrix>/<kind>``: kind is ``item_factors``, ``user_factors`` or ``tag_factors``."""
    return f"factors/{matrix}/{kind}"


def factors_table(ids: list[str], factors: np.ndarray, *, id_column: str, run_id: str, split: list[str] | None = None) -> pa.Table:
    """Arrow table ``(id, factors list<float32>[, split], run_id)`` from ``factors (n, f)``."""
    f = np.ascontiguousarray(factors, dtype=np.float32)
    values = pa.array(f.reshape(-1), pa.float32())
    offsets = pa.array(np.arange(0, f.size + 1, f.shape[1], dtype=np.int32))
    cols = {id_column: pa.array(ids, pa.string()), "factors": pa.ListArray.from_arrays(offsets, values)}
    if split is not None:
        cols["split"] = pa.array(split, pa.string())
    cols["run_id"] = pa.array([run_id] * len(ids), pa.string())
    return pa.table(cols)


def factors_matrix(table: pa.Table) -> np.ndarray:
    """``factors`` column of a factors table -> ``(n, f)`` float32."""
    col = table["factors"].combine_chunks()
    n = len(col)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


def factors_by_index(storage: Storage, factors_name: str, index_name: str, *, id_column: str,
                     n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A published factors dataset laid out by its id map: ``(factors (n_rows, f) float32, has
    (n_rows,) bool)``, row i = the id whose index is i; ids without factors (e.g. users with no
    train plays) get a zero row and ``has[i] = False``.

    ``factors_name`` e.g. ``factors_dataset("plays", "user_factors")``, ``index_name`` the id
    map (``USER_INDEX`` / ``TAG_INDEX``) keyed by ``id_column``; ``n_rows`` is the matrices'
    size on that side."""
    table = storage.read_dataset(storage.uri(factors_name))
    index = storage.read_dataset(storage.uri(index_name))
    rows = pc.take(index["idx"], pc.index_in(table[id_column], value_set=index[id_column]))
    rows = rows.to_numpy(zero_copy_only=False).astype(np.int64)
    f = factors_matrix(table)
    out = np.zeros((n_rows, f.shape[1]), np.float32)
    out[rows] = f
    has = np.zeros(n_rows, bool)
    has[rows] = True
    return out, has


def _ids_by_index(storage: Storage, name: str, id_column: str) -> np.ndarray:
    t = storage.read_dataset(storage.uri(name))
    out = np.empty(t.num_rows, dtype=object)
    out[t["idx"].to_numpy()] = np.asarray(t[id_column].to_pylist(), dtype=object)
    return out


def run_factorize(cfg: Config, storage: Storage, spark=None, *, warehouse=None) -> StageResult:
    """Run the stage for ``cfg.factorize.matrix``; see the module docstring."""
    fc = cfg.factorize
    exports = storage.published(storage.uri(EXPORTS))
    if exports is None:
        raise FileNotFoundError(f"factorize needs the matrices exports at {storage.uri(EXPORTS)}; run `deepcontent matrices` first")
    out_names = ["item_factors", "user_factors" if fc.matrix == "plays" else "tag_factors"]
    outputs = {n: storage.uri(factors_dataset(fc.matrix, n)) for n in out_names}
    fingerprint = hashlib.sha256(json.dumps([exports["run_id"], cfg.fingerprint("factorize")]).encode()).hexdigest()[:24]
    current = [storage.published(u) for u in outputs.values()]
    if all(p is not None and p.get("input_fingerprint") == fingerprint for p in current):
        log.info("factorize: %s factors are up to date (run %s); nothing to do", fc.matrix, current[0]["run_id"])
        return StageResult(current[0]["run_id"], False, outputs=outputs)

    run_id = new_run_id(STAGE)
    manifest = RunManifest(STAGE, run_id, cfg.public_dict(), cfg.fingerprint("factorize"))
    manifest.inputs = {"matrices": exports["run_id"], "fingerprint": fingerprint}
    files = export_files(storage, exports)
    prefix = "user_items" if fc.matrix == "plays" else "item_tags"
    with manifest.timed("load"):
        train = load_csr(storage, files[f"{prefix}_train.npz"])
        valid = load_csr(storage, files[f"{prefix}_valid.npz"])
    n_factors = fc.tag_factors if fc.matrix == "tags" and fc.tag_factors else fc.factors
    params = dict(factors=n_factors, alpha=fc.alpha, eps=fc.eps, regularization=fc.regularization,
                  iterations=fc.iterations, seed=fc.seed)
    if fc.backend == "implicit":
        params["num_threads"] = fc.num_threads
    if fc.backend == "spark":
        if spark is None:
            raise ValueError("factorize.backend=spark needs a Spark session")
        params["spark"] = spark
    log.info("factorize: %s backend on %s matrix %d × %d (nnz %d), %d factors, %d iterations", fc.backend, fc.matrix,
             train.shape[0], train.shape[1], train.nnz, n_factors, fc.iterations)
    with manifest.timed("fit"):
        row_factors, col_factors = make_factorizer(fc.backend, **params).fit(train)

    with manifest.timed("fold_in"):
        item_ids = _ids_by_index(storage, ITEM_INDEX, "song_id")
        split_tbl = storage.read_dataset(storage.uri(SPLITS))
        split_of = dict(zip(split_tbl["song_id"].to_pylist(), split_tbl["split"].to_pylist()))
        if fc.matrix == "plays":
            # items are columns: train items from the fit, valid items folded in from their plays
            item_train = col_factors
            has_train = np.diff(train.tocsc().indptr) > 0
            valid_items = sp.csr_matrix(valid.T)
            has_valid = np.diff(valid_items.indptr) > 0
            item_valid = fold_in(valid_items, row_factors, alpha=fc.alpha, eps=fc.eps, regularization=fc.regularization)
            other_ids, other_col, other_factors = _ids_by_index(storage, USER_INDEX, "user_id"), "user_id", row_factors
            other_has = np.diff(train.indptr) > 0
        else:
            # songs are rows of the song × tag matrix
            item_train = row_factors
            has_train = np.diff(train.indptr) > 0
            has_valid = np.diff(valid.indptr) > 0
            item_valid = fold_in(valid, col_factors, alpha=fc.alpha, eps=fc.eps, regularization=fc.regularization)
            other_ids, other_col, other_factors = _ids_by_index(storage, TAG_INDEX, "tag"), "tag", col_factors
            other_has = np.diff(train.tocsc().indptr) > 0
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
            np.vstack([item_train[pick_train], item_valid[pick_valid]]) if len(pick_train) + len(pick_valid) else np.zeros((0, n_factors)),
            id_column="song_id", run_id=run_id, split=["train"] * len(pick_train) + ["valid"] * len(pick_valid))
        pick_other = np.flatnonzero(other_has)
        others = factors_table(list(other_ids[pick_other]), other_factors[pick_other], id_column=other_col, run_id=run_id)

    with manifest.timed("publish"):
        meta = {"stage": STAGE, "input_fingerprint": fingerprint, "matrix": fc.matrix, "backend": fc.backend}
        for name, table in zip(out_names, (items, others)):
            f = join(storage.staging_uri(outputs[name], run_id), "part-00000.parquet")
            storage.write_parquet(table, f)
            storage.publish(outputs[name], run_id=run_id, files=[f], meta=meta)
        if warehouse is not None and fc.matrix == "plays":
            warehouse.ensure_tables(["item_factors", "user_factors"])
            warehouse.upsert("item_factors", items.drop_columns(["split"]), run_id=run_id)
            warehouse.upsert("user_factors", others, run_id=run_id)
            manifest.outputs["warehouse"] = "item_factors, user_factors"
    manifest.counts = {"train_items": len(pick_train), "valid_items": len(pick_valid), f"{other_col}s": len(pick_other),
                       "nnz_train": int(train.nnz)}
    manifest.outputs.update(outputs)
    uri = manifest.write(storage, status="succeeded")
    log.info("factorize: %s factors for %d train + %d valid songs and %d %ss; manifest %s", fc.matrix, len(pick_train),
             len(pick_valid), len(pick_other), other_col, uri)
    return StageResult(run_id, True, counts=manifest.counts, outputs=outputs, manifest_uri=uri)
