"""Training data: targets from the published inputs, and resident clip banks on the workers.

Targets (:func:`training_targets`, pure: Arrow in, Arrow out)
    tracks (track_id -> song_id) joined with the item factors of one WMF: train songs give the
    regression targets, valid songs the validation targets; test songs and songs without
    factors are left out here, so their audio never reaches a worker. Targets are standardised
    per factor with the mean / std of the *train* targets (stored with the model to undo it).
    The train stage reads the inputs (:func:`deepcontent.stages.train.load_training_data`).

Ray Data (:mod:`deepcontent.train.clip_data`)
    Streams the spectrogram shards with these targets attached to the workers.

Worker side (:class:`ClipBank`)
    Each worker pulls its shard *once* into a resident bank of whole-clip log-mels (float16,
    on the training device) and cuts random windows there every step (see
    ``docs/architecture.md``, performance notes): a 3 s window is 33 KB, so shipping windows
    would make training input-bound; shipping clips once costs one pass over the shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from deepcontent.datasets import vector_column, vectors
from deepcontent.errors import TrainingDataError

__all__ = [
    "ClipBank",
    "TrainingData",
    "TrainingDataError",
    "standardize",
    "training_targets",
]


def standardize(
    factors: np.ndarray, *, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-factor z-scores ``(n, f)``, with the mean and std used ``(f,)`` each.

    ``mean`` / ``std`` default to the statistics of ``factors`` itself (pass the train
    statistics to standardise valid targets the same way). A factor with zero spread gets
    std 1, so it maps to 0 instead of NaN.
    """
    x = np.asarray(factors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"factors must be (n, f), got shape {x.shape}")
    if mean is None:
        mean = x.mean(axis=0)
    if std is None:
        sd = x.std(axis=0)
        std = np.where(sd > 0, sd, 1.0)
    z = (x - mean) / std
    return z.astype(np.float32), np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)


@dataclass
class TrainingData:
    """What the driver knows before training (small: ids and factors, no audio).

    Attributes
    ----------
    train, valid : pa.Table
        ``(track_id, song_id, item_idx int32, target list<float32>, n_frames int64)``, one row
        per track with a clip; ``target`` is standardised; ``item_idx`` is the song's column in
        the matrices exports (-1 when the item index is not published); ``n_frames`` is the
        clip's length (null when the clips were given without it).
    target_mean, target_std : np.ndarray [shape=(f,)]
        Raw factors = ``target * std + mean``.
    valid_variance : float
        ``mean_j var(valid target[:, j])``: the NMSE denominator (predicting the valid mean
        scores exactly 1).
    spectrogram_files : list of str
        URIs of the published clip shards.
    inputs : dict
        Run ids of every input (the data snapshot the model version is derived from).
    settings_key, n_mels : str, int
        The clips' settings and band count (one value across the catalog).
    """

    train: pa.Table
    valid: pa.Table
    target_mean: np.ndarray
    target_std: np.ndarray
    valid_variance: float
    spectrogram_files: list[str]
    inputs: dict[str, str]
    settings_key: str | None
    n_mels: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_factors(self) -> int:
        return int(self.target_mean.shape[0])


def training_targets(*, tracks: pa.Table, clips: pa.Table, item_factors: pa.Table, item_index: pa.Table | None,
                     where: str = "the clip dataset") -> dict:
    """Train / valid targets from the published inputs (pure).

    Parameters
    ----------
    tracks : pa.Table
        ``(track_id, song_id)``.
    clips : pa.Table
        ``(track_id, n_mels[, n_frames])`` of every stored clip.
    item_factors : pa.Table
        ``(song_id, factors, split)`` of one WMF (train and valid songs).
    item_index : pa.Table or None
        ``(song_id, idx)``: the songs' columns in the play matrix (None: ``item_idx`` = -1).
    where : str
        Names the clip dataset in error messages.

    Returns
    -------
    dict
        ``train``, ``valid`` (tables as in :class:`TrainingData`), ``target_mean``,
        ``target_std``, ``valid_variance``, ``n_mels``, ``counts``.

    Raises
    ------
    TrainingDataError
        If no train or no valid track has both a clip and factors, if the clips disagree on
        ``n_mels``, or if the valid targets have no variance.
    """
    mels = set(clips["n_mels"].to_pylist())
    if len(mels) > 1:
        raise TrainingDataError(f"clips at {where} mix n_mels values {sorted(mels)}; recompute them with one setting")
    if item_index is not None:
        pos = pc.index_in(item_factors["song_id"], value_set=item_index["song_id"])
        item_idx = pc.take(item_index["idx"], pos).cast(pa.int32()).fill_null(-1)
    else:
        item_idx = pa.array(np.full(item_factors.num_rows, -1, np.int32))

    # track -> song -> (factors, split): only tracks that also have a clip
    with_clip = tracks.filter(pc.is_in(tracks["track_id"], value_set=clips["track_id"]))
    pos = pc.index_in(with_clip["song_id"], value_set=item_factors["song_id"])
    keep = pc.is_valid(pos)
    with_clip, pos = with_clip.filter(keep), pos.filter(keep)
    split = pc.take(item_factors["split"], pos)
    factors = vectors(item_factors.take(pos)["factors"])
    idx = pc.take(item_idx, pos)

    is_train = np.asarray(pc.equal(split, "train").to_numpy(zero_copy_only=False), dtype=bool)
    is_valid = np.asarray(pc.equal(split, "valid").to_numpy(zero_copy_only=False), dtype=bool)
    if not is_train.any() or not is_valid.any():
        raise TrainingDataError(
            f"need train and valid tracks with both a clip and item factors; found {int(is_train.sum())} train "
            f"and {int(is_valid.sum())} valid ({clips.num_rows} clips at {where}, "
            f"{item_factors.num_rows} songs with factors)")
    z_train, mean, std = standardize(factors[is_train])
    z_valid, _, _ = standardize(factors[is_valid], mean=mean, std=std)
    valid_variance = float(z_valid.astype(np.float64).var(axis=0).mean())
    if not valid_variance > 0:
        raise TrainingDataError(f"the {int(is_valid.sum())} valid tracks' targets have zero variance; NMSE is undefined")

    n_frames = (pc.take(clips["n_frames"], pc.index_in(with_clip["track_id"], value_set=clips["track_id"])).cast(pa.int64())
                if "n_frames" in clips.column_names else pa.nulls(with_clip.num_rows, pa.int64()))

    def table(mask: np.ndarray, z: np.ndarray) -> pa.Table:
        rows = pa.array(np.flatnonzero(mask))
        return pa.table({"track_id": pc.take(with_clip["track_id"], rows), "song_id": pc.take(with_clip["song_id"], rows),
                         "item_idx": pc.take(idx, rows), "target": vector_column(z), "n_frames": pc.take(n_frames, rows)})

    train, valid = table(is_train, z_train), table(is_valid, z_valid)
    return {
        "train": train, "valid": valid, "target_mean": mean, "target_std": std, "valid_variance": valid_variance,
        "n_mels": int(next(iter(mels))) if mels else 0,
        "counts": {"train_tracks": train.num_rows, "valid_tracks": valid.num_rows,
                   "train_songs": len(set(train["song_id"].to_pylist())),
                   "valid_songs": len(set(valid["song_id"].to_pylist())),
                   "spectrograms": clips.num_rows, "factors": factors.shape[1]},
    }


# ----------------------------------------------------------------------------- worker side
@dataclass
class ClipBank:
    """Whole-clip log-mels resident in one tensor, with their targets.

    Attributes
    ----------
    frames : torch.Tensor [shape=(total_frames, n_mels), dtype=float16]
        Every clip's frames back to back, time-major (no padding between clips, so long clips
        cost only their own memory; a window is a run of contiguous 256-byte rows, which makes
        cropping a row gather, ~6x cheaper than gathering columns of band-major storage);
        clips shorter than the window were zero-padded (silence) to it.
    offsets, lengths : torch.LongTensor [shape=(n_clips,)]
        Where each clip starts in ``frames`` and how many frames it has.
    targets : torch.Tensor [shape=(n_clips, f), dtype=float32]
        Standardised factors.
    items : torch.LongTensor [shape=(n_clips,)]
        The song's column in the play matrix (for the WPE loss), -1 if unknown.
    track_ids : list of str
    """

    frames: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    items: torch.Tensor
    track_ids: list[str]

    def __len__(self) -> int:
        return len(self.track_ids)

    @classmethod
    def from_batches(cls, batches: Iterable[pa.Table | dict], *, min_frames: int, n_factors: int, n_mels: int) -> "ClipBank":
        """Build a bank from Arrow batches of ``(track_id, n_mels, n_frames, mel, target, item_idx)``.

        Raises
        ------
        ValueError
            If a row's ``n_mels`` differs from ``n_mels``, its mel blob does not hold
            ``n_mels × n_frames`` float16 values, or its target is not of length ``n_factors``;
            the message names the track.
        """
        from deepcontent.train.clip_cache import load_clips  # the same row checks as the budgeted loader

        return load_clips(batches, budget_bytes=None, spill_path=None, min_frames=min_frames, n_factors=n_factors,
                          n_mels=n_mels).bank

    def to(self, device: torch.device, *, move=None) -> "ClipBank":
        """The bank on ``device``; ``move(tensor, device)`` does the copy (pinned on GPU, see
        :meth:`deepcontent.train.backend.Backend.to_device`)."""
        move = move or (lambda t, d: t.to(d))
        return ClipBank(frames=move(self.frames, device), offsets=move(self.offsets, device),
                        lengths=move(self.lengths, device), targets=move(self.targets, device),
                        items=self.items, track_ids=self.track_ids)

    def clip(self, i: int) -> torch.Tensor:
        """Clip ``i`` as a view ``(n_mels, n_frames_i)``."""
        o, n = int(self.offsets[i]), int(self.lengths[i])
        return self.frames[o : o + n].T

    def random_windows(self, clips: torch.Tensor, *, n_frames: int, generator: torch.Generator) -> torch.Tensor:
        """One random window per entry of ``clips``, cut where the bank lives.

        Parameters
        ----------
        clips : torch.LongTensor [shape=(batch,)]
            Clip indices (on the bank's device).
        n_frames : int
            Window length; every clip has at least this many frames (padded at load).
        generator : torch.Generator
            On the bank's device; draws the start offsets (uniform over each clip).

        Returns
        -------
        windows : torch.Tensor [shape=(batch, n_mels, n_frames), dtype=float16]
            A transposed view of the gathered ``(batch, n_frames, n_mels)`` rows (not
            contiguous; convolutions take it as it is).
        """
        high = self.lengths[clips] - n_frames  # >= 0
        u = torch.rand(clips.shape[0], generator=generator, device=self.frames.device)
        starts = self.offsets[clips] + torch.minimum((u * (high + 1).to(u.dtype)).long(), high)
        pos = starts[:, None] + torch.arange(n_frames, device=self.frames.device)
        return self.frames[pos].transpose(1, 2)  # (batch, n_frames, n_mels) rows -> (batch, n_mels, n_frames)
