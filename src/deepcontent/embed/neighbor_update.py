"""Nightly neighbours without rebuilding: update the last run's index and lists in place.

A nightly changes a small share of a catalog's vectors (new tracks, re-encoded audio), but the
full search rebuilds the index and searches every track: at a million tracks that is minutes of
work for a 1% change. Given the index the previous run exported and the neighbour lists it
published, an update

1. **plans** (:func:`plan_update`): by a 64-bit hash of each vector
   (:func:`deepcontent.embed.ann.row_hashes`), which tracks are unchanged, changed, new or gone;
   a changed or gone track's old index row becomes *dead* (faiss's graph index cannot delete: a
   dead row stays in the graph and is excluded from every result), a changed or new track's
   vector is added as a new row;
2. **finds whose list can change** (:func:`affected_positions`): the changed and new tracks
   themselves and every track whose list holds a changed or gone track are searched again; a
   track that a changed or new vector now outranks — found by searching that vector's own
   ``reverse_candidates`` nearest tracks (similarity is symmetric) and comparing with each one's
   current k-th score — only gains members, merged into its list (:func:`merge_entries`);
3. every other list stays as published.

The reverse step is approximate in the way the index is: a track that should now list a new
vector but is not among that vector's ``reverse_candidates`` nearest keeps its old list. The
stage therefore measures recall@k of the *assembled* lists against exact search on its seeded
sample, exactly as for a full run, and rebuilds when it falls short, when the churn exceeds
``neighbors.max_incremental_fraction`` or when dead rows exceed
``neighbors.rebuild_dead_fraction`` of the index.

Positions are rows of the current vectors (tracks sorted by id); *rows* are index ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepcontent.embed import ann

__all__ = ["UpdatePlan", "affected_positions", "merge_entries", "plan_update", "previous_lists", "update_neighbors"]


@dataclass(frozen=True)
class UpdatePlan:
    """What an update does to the index (see :func:`plan_update`).

    Attributes
    ----------
    row_of_pos : np.ndarray [shape=(n,), dtype=int64]
        The index row of each current track's vector; -1 for those to add.
    add_pos : np.ndarray [shape=(a,), dtype=int64]
        Positions whose vectors are added as new rows (changed first, then new), in this order.
    changed_pos : np.ndarray [shape=(c,), dtype=int64]
        Positions of tracks whose vector changed (a subset of ``add_pos``).
    gone_rows : np.ndarray [shape=(g,), dtype=int64]
        Alive rows of tracks no longer in the catalog.
    dead_rows : np.ndarray [shape=(e,), dtype=int64]
        Every row excluded from results after the update (dead before, gone, changed).
    """

    row_of_pos: np.ndarray
    add_pos: np.ndarray
    changed_pos: np.ndarray
    gone_rows: np.ndarray
    dead_rows: np.ndarray

    @property
    def churn(self) -> int:
        """Tracks added, changed or gone."""
        return len(self.add_pos) + len(self.gone_rows)


def plan_update(*, row_track_ids: pa.Array, row_alive: np.ndarray, row_hashes: np.ndarray,
                track_ids: pa.Array, hashes: np.ndarray) -> UpdatePlan:
    """Compare an exported index's rows with the current vectors.

    Parameters
    ----------
    row_track_ids : pa.Array [shape=(r,)]
        The track id of each index row (dead rows included).
    row_alive : np.ndarray [shape=(r,), dtype=bool]
    row_hashes : np.ndarray [shape=(r,), dtype=uint64]
        :func:`~deepcontent.embed.ann.row_hashes` of each row's vector.
    track_ids : pa.Array [shape=(n,)]
        The current tracks, distinct.
    hashes : np.ndarray [shape=(n,), dtype=uint64]
        The current vectors' hashes.

    Returns
    -------
    UpdatePlan
    """
    n, r = len(track_ids), len(row_track_ids)
    if not (len(row_alive) == len(row_hashes) == r) or len(hashes) != n:
        raise ValueError(f"lengths disagree: {r} rows, {len(row_alive)} alive flags, {len(row_hashes)} row hashes; "
                         f"{n} tracks, {len(hashes)} hashes")
    alive_rows = np.flatnonzero(row_alive).astype(np.int64)
    pos = pc.index_in(pc.take(row_track_ids, pa.array(alive_rows)), value_set=track_ids)
    pos = pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    kept = pos >= 0
    kept_rows, kept_pos = alive_rows[kept], pos[kept]
    same = np.asarray(row_hashes)[kept_rows] == np.asarray(hashes)[kept_pos]
    row_of_pos = np.full(n, -1, np.int64)
    row_of_pos[kept_pos[same]] = kept_rows[same]
    changed_pos = np.sort(kept_pos[~same])
    seen = np.zeros(n, bool)
    seen[kept_pos] = True
    new_pos = np.flatnonzero(~seen).astype(np.int64)
    gone_rows = alive_rows[~kept]
    dead_rows = np.sort(np.concatenate([np.flatnonzero(~np.asarray(row_alive, bool)), gone_rows, kept_rows[~same]]))
    return UpdatePlan(row_of_pos=row_of_pos, add_pos=np.concatenate([changed_pos, new_pos]), changed_pos=changed_pos,
                      gone_rows=gone_rows, dead_rows=dead_rows.astype(np.int64))


def previous_lists(rows: pa.Table, track_ids: pa.Array, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The published neighbour lists as matrices over the current positions.

    Parameters
    ----------
    rows : pa.Table
        ``similar_tracks`` rows of one model version (``track_id``, ``neighbor_track_id``,
        ``rank`` from 1, ``score``).
    track_ids : pa.Array [shape=(n,)]
        The current tracks.
    k : int
        Columns of the result (ranks beyond ``k`` are ignored).

    Returns
    -------
    neighbors : np.ndarray [shape=(n, k), dtype=int64]
        Position of each listed neighbour; -1 where nothing is listed, -2 where the listed
        neighbour is no longer in the catalog.
    scores : np.ndarray [shape=(n, k), dtype=float32]
        -inf where nothing is listed.
    """
    n = len(track_ids)
    neighbors = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    if rows.num_rows == 0:
        return neighbors, scores
    owner = pc.index_in(rows["track_id"], value_set=track_ids).fill_null(-1).to_numpy(zero_copy_only=False)
    other = pc.index_in(rows["neighbor_track_id"], value_set=track_ids).fill_null(-2).to_numpy(zero_copy_only=False)
    rank = rows["rank"].to_numpy().astype(np.int64) - 1
    keep = (owner >= 0) & (rank >= 0) & (rank < k)
    neighbors[owner[keep], rank[keep]] = other[keep]
    scores[owner[keep], rank[keep]] = rows["score"].to_numpy(zero_copy_only=False)[keep]
    return neighbors, scores


def affected_positions(*, prev_neighbors: np.ndarray, prev_scores: np.ndarray, plan: UpdatePlan,
                       reverse_neighbors: np.ndarray, reverse_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tracks whose list must change, and how.

    Parameters
    ----------
    prev_neighbors, prev_scores : np.ndarray [shape=(n, k)]
        :func:`previous_lists`.
    plan : UpdatePlan
    reverse_neighbors, reverse_scores : np.ndarray [shape=(a, c)]
        For each of ``plan.add_pos``, its nearest current tracks (positions, -1 = none) and
        similarities, searched in the updated index.

    Returns
    -------
    search : np.ndarray [shape=(s,), dtype=int64], sorted
        Lists to search again: ``plan.add_pos``, every track listing a changed or gone track,
        and every track the last run did not list.
    entered : np.ndarray [shape=(e,), dtype=int64], sorted
        The other tracks that some added vector outranks (its similarity above the track's
        current k-th score): their lists only gain members, merged by :func:`merge_entries`.
    """
    n = prev_neighbors.shape[0]
    search = np.zeros(n, bool)
    search[plan.add_pos] = True
    stale = np.zeros(n + 2, bool)  # shifted by 2: -2 (gone) and -1 (none) index the first slots
    stale[plan.changed_pos + 2] = True
    stale[0] = True
    if prev_neighbors.shape[1]:
        search |= stale[prev_neighbors + 2].any(axis=1)
        search |= (prev_neighbors == -1).all(axis=1)
    entered = np.zeros(n, bool)
    if reverse_neighbors.size:
        kth = prev_scores[:, -1] if prev_scores.shape[1] else np.full(n, -np.inf, np.float32)
        found = reverse_neighbors >= 0
        u = reverse_neighbors[found]
        entered[u[reverse_scores[found] > kth[u]]] = True
    return np.flatnonzero(search).astype(np.int64), np.flatnonzero(entered & ~search).astype(np.int64)


def merge_entries(*, prev_neighbors: np.ndarray, prev_scores: np.ndarray, owners: np.ndarray,
                  entries: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The lists of ``owners`` with new members merged in: the top ``k`` of the old list and the
    entries, most similar first, ties by position (as the searches order them).

    Parameters
    ----------
    prev_neighbors, prev_scores : np.ndarray [shape=(n, k)]
    owners : np.ndarray [shape=(m,), dtype=int64]
        The lists to merge into.
    entries : (owner, neighbor, score) arrays [shape=(p,)]
        Candidate members; those of other owners are ignored.

    Returns
    -------
    neighbors, scores : np.ndarray [shape=(m, k)]
    """
    k = prev_neighbors.shape[1]
    owner, other, score = entries
    mine = np.isin(owner, owners)
    row_of = np.full(prev_neighbors.shape[0], -1, np.int64)
    row_of[owners] = np.arange(len(owners))
    rows = np.concatenate([np.repeat(np.arange(len(owners)), k), row_of[owner[mine]]])
    cand = np.concatenate([prev_neighbors[owners].ravel(), other[mine]])
    cand_score = np.concatenate([prev_scores[owners].ravel(), score[mine]]).astype(np.float32)
    keep = cand >= 0
    rows, cand, cand_score = rows[keep], cand[keep], cand_score[keep]
    order = np.lexsort((cand, -cand_score, rows))
    rows, cand, cand_score = rows[order], cand[order], cand_score[order]
    start = np.searchsorted(rows, np.arange(len(owners)))
    rank = np.arange(len(rows)) - start[rows]
    top = rank < k
    neighbors = np.full((len(owners), k), -1, np.int64)
    scores = np.full((len(owners), k), -np.inf, np.float32)
    neighbors[rows[top], rank[top]] = cand[top]
    scores[rows[top], rank[top]] = cand_score[top]
    return neighbors, scores


def update_neighbors(index, *, unit: np.ndarray, plan: UpdatePlan, prev_neighbors: np.ndarray,
                     prev_scores: np.ndarray, k: int, reverse_candidates: int,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Add the plan's vectors to ``index`` (in place) and bring the lists up to date.

    Parameters
    ----------
    index : faiss.Index
        The previous run's index (rows = ``plan``'s rows), with its search effort set.
    unit : np.ndarray [shape=(n, d), dtype=float32]
        The current unit vectors (positions).
    plan : UpdatePlan
    prev_neighbors, prev_scores : np.ndarray [shape=(n, k)]
        :func:`previous_lists`.
    k : int
    reverse_candidates : int >= 1
        Nearest tracks searched around each added vector to find the lists it enters.

    Returns
    -------
    neighbors : np.ndarray [shape=(n, min(k, n - 1)), dtype=int64]
        Positions; the affected rows up to date, the others as published.
    scores : np.ndarray [shape=(n, min(k, n - 1)), dtype=float32]
    affected : np.ndarray [shape=(m,), dtype=int64]
        The positions whose list may differ from the published one (searched again or merged).
    pos_of_row : np.ndarray [shape=(index.ntotal,), dtype=int64]
        The position of each index row's track after the update (-1 for a dead row).
    searched : int
        How many of ``affected`` were searched again (the rest had members merged in).
    """
    n = unit.shape[0]
    kk = min(k, n - 1)
    first_new = index.ntotal
    if len(plan.add_pos):
        index.add(np.ascontiguousarray(unit[plan.add_pos]))
    row_of_pos = plan.row_of_pos.copy()
    row_of_pos[plan.add_pos] = first_new + np.arange(len(plan.add_pos), dtype=np.int64)
    pos_of_row = np.full(index.ntotal, -1, np.int64)
    pos_of_row[row_of_pos] = np.arange(n, dtype=np.int64)

    def search(positions: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        rows, scores = ann.search_index(index, unit, positions, k=count, self_rows=row_of_pos[positions],
                                        exclude=plan.dead_rows)
        return np.where(rows >= 0, pos_of_row[np.maximum(rows, 0)], -1), scores

    reverse_neighbors, reverse_scores = search(plan.add_pos, min(reverse_candidates, n - 1))
    prev_neighbors, prev_scores = prev_neighbors[:, :kk], prev_scores[:, :kk]
    again, entered = affected_positions(prev_neighbors=prev_neighbors, prev_scores=prev_scores, plan=plan,
                                        reverse_neighbors=reverse_neighbors, reverse_scores=reverse_scores)
    neighbors, scores = prev_neighbors.copy(), prev_scores.copy()
    neighbors[again], scores[again] = search(again, kk)
    # Similarity is symmetric: the added vector v found u at score s, so v enters u's list at s.
    found = reverse_neighbors >= 0
    added = np.broadcast_to(plan.add_pos[:, None], reverse_neighbors.shape)
    entries = (reverse_neighbors[found], added[found], reverse_scores[found])
    neighbors[entered], scores[entered] = merge_entries(prev_neighbors=prev_neighbors, prev_scores=prev_scores,
                                                        owners=entered, entries=entries)
    return neighbors, scores, np.union1d(again, entered), pos_of_row, len(again)
