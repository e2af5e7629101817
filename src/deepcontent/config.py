"""Typed configuration: YAML files, an environment overlay, and ``key.path=value`` overrides.

Loading order (later wins):

1. ``conf/base.yaml`` (always; the defaults every deployment shares),
2. the named config file (``conf/local.yaml``, a cluster file, ...), which may name further
   files to layer under it with ``extends:``,
3. environment variables ``DEEPCONTENT__SECTION__KEY=value`` (double underscore = one level),
4. ``key.path=value`` overrides from the command line.

Values from 3 and 4 are parsed as YAML scalars, so ``synth.songs=500`` is an int and
``storage.embedded_s3=false`` a bool.

Secrets never live in these files. S3 keys come from the standard AWS environment variables
or from a credentials file outside the repository (``storage.credentials_file``); a catalog
password comes from ``warehouse.catalog_password_env``. The models below keep secrets in
:class:`pydantic.SecretStr`, so printing a config or writing it to a manifest never shows them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from deepcontent.audio.settings import MEL_FIELDS, MelSettings
from deepcontent.errors import ConfigError
from deepcontent.redact import looks_secret, redact, redact_text, register_secret

__all__ = ["Config", "ConfigError", "PlaysSource", "TableSource", "load_config", "parse_overrides"]

ENV_PREFIX = "DEEPCONTENT__"
_MEL = MelSettings()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    """Where every stage reads and writes.

    ``root`` is a URI (``s3://bucket/prefix`` or ``file:///abs/path``); every stage's inputs and
    outputs are keys under it. With ``embedded_s3`` the CLI starts a real S3-compatible server
    on loopback (``rclone serve s3``) serving ``embedded_s3_dir`` and points ``endpoint_url``
    and the credentials at it for the run.
    """

    root: str = "s3://deepcontent"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    credentials_file: str | None = None
    credentials_profile: str = "default"
    embedded_s3: bool = False
    embedded_s3_dir: str = ".deepcontent/s3"
    # Raw inputs (the catalog as published) live under this prefix of root.
    raw_prefix: str = "raw"
    # Unreferenced data files younger than this are never swept (a run in flight stages them).
    sweep_grace_s: float = Field(default=6 * 3600.0, ge=0)
    # A publish lock (stores without conditional writes) older than this is a dead writer's.
    lock_lease_s: float = Field(default=60.0, gt=0)

    @field_validator("root")
    @classmethod
    def _root_scheme(cls, v: str) -> str:
        if not (v.startswith("s3://") or v.startswith("file://")):
            raise ValueError(f"storage.root must start with s3:// or file://, got {v!r}")
        return v.rstrip("/")


class WarehouseConfig(_Section):
    """Iceberg catalog. ``type: sql`` with a SQLite ``uri`` is the embedded default; Postgres
    (``postgresql+psycopg2://user@host/db`` with the password from ``catalog_password_env``),
    ``rest`` and ``glue`` are the cluster choices."""

    catalog_name: str = "deepcontent"
    type: Literal["sql", "rest", "glue"] = "sql"
    uri: str = "sqlite:///.deepcontent/catalog.db"
    catalog_password_env: str | None = None
    namespace: str = "deepcontent"
    # Where Iceberg writes data/metadata files; defaults to <storage.root>/warehouse.
    location: str | None = None
    properties: dict[str, str] = Field(default_factory=dict)


class SparkConfig(_Section):
    master: str = "local[*]"
    app_name: str = "deepcontent"
    driver_memory: str = "4g"
    executor_memory: str = "4g"
    shuffle_partitions: int = 8
    conf: dict[str, str] = Field(default_factory=dict)


class RayConfig(_Section):
    address: str | None = None
    num_cpus: int | None = None
    include_dashboard: bool = False
    # Ray workers' stdout / stderr forwarded to the driver: null = inside a Ray job (address
    # "auto": the job's log) or with `deepcontent -v`, not on a plain console (they are always
    # in Ray's session logs).
    log_to_driver: bool | None = None


class TableSource(_Section):
    """A table the catalog arrives as.

    ``uri``: a CSV / TSV / Parquet file or a folder of Parquet files, as a key under the raw
    prefix or a full URI (``s3://any-bucket/...``, ``file:///...``), or an Iceberg table of the
    configured warehouse catalog as ``iceberg:<namespace>.<table>``. ``format`` ``auto`` decides
    by the URI. ``columns`` maps the canonical column names to the source's own (identity for
    any name not given)."""

    uri: str
    format: Literal["auto", "csv", "tsv", "parquet", "iceberg"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)

    def column(self, name: str) -> str:
        return self.columns.get(name, name)


class PlaysSource(TableSource):
    """Plays as a table: ``kind: counts`` (``user_id``, ``song_id`` or ``track_id``,
    ``play_count``) or ``kind: events`` (``user_id``, ``track_id`` or ``song_id``,
    ``timestamp``: one row per listen), which Spark aggregates to counts over the events in
    ``[since, until)`` (ISO-8601 times, UTC when no zone is given; open-ended when null)."""

    kind: Literal["counts", "events"] = "counts"
    since: str | None = None
    until: str | None = None

    @field_validator("since", "until", mode="before")
    @classmethod
    def _iso(cls, v):  # YAML reads 2026-03-15 as a date
        import datetime as dt

        return v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v

    @model_validator(mode="after")
    def _window(self) -> "PlaysSource":
        import datetime as dt

        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                try:
                    dt.datetime.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"plays table {name}={value!r} is not an ISO-8601 date or time") from None
        return self


class SourcesConfig(_Section):
    """Where the catalog comes from, below ``<storage.root>/<storage.raw_prefix>`` unless a
    full URI is given.

    ``catalog`` is how the track list arrives: ``msd`` (``unique_tracks.txt`` + audio named
    ``<track_id>.<ext>`` under ``audio``), ``table`` (``track_table``: a track list whose audio
    column names each track's object, by key under ``audio`` or by full URI) or ``folder`` (no
    list at all: every object under ``audio`` is a track, its id derived from its key); ``auto``
    is ``table`` when ``track_table`` is set, else ``msd``. ``plays`` and ``tags`` are optional:
    ``auto`` takes the table when one is set, else the Taste Profile / Last.fm files when they
    exist, else none (an audio-only catalog can still be embedded with a trained model)."""

    catalog: Literal["auto", "msd", "table", "folder"] = "auto"
    plays: Literal["auto", "taste_profile", "table", "none"] = "auto"
    tags: Literal["auto", "lastfm", "table", "none"] = "auto"
    track_table: TableSource | None = None
    play_table: PlaysSource | None = None
    tag_table: TableSource | None = None
    triplets: str = "taste_profile/train_triplets.txt"
    mismatches: str = "taste_profile/sid_mismatches.txt"
    tracks: str = "msd/unique_tracks.txt"
    lastfm_json: str = "lastfm/lastfm_train"
    lastfm_db: str = "lastfm/lastfm_tags.db"
    audio: str = "audio"
    gtzan: str = "gtzan/genres"
    mtat: str = "magnatagatune"

    @model_validator(mode="after")
    def _tables_given(self) -> "SourcesConfig":
        for kind, table in (("catalog", "track_table"), ("plays", "play_table"), ("tags", "tag_table")):
            if getattr(self, kind) == "table" and getattr(self, table) is None:
                raise ValueError(f"sources.{kind}=table needs sources.{table} (uri and columns)")
        return self

    def catalog_kind(self) -> str:
        return self.catalog if self.catalog != "auto" else ("table" if self.track_table is not None else "msd")


class SynthConfig(_Section):
    """The generated catalog: sizes and what to write. See :mod:`deepcontent.synth`."""

    seed: int = 0
    songs: int = 200
    users: int = 2000
    # Target distinct songs per user (a user whose taste reaches fewer songs gets fewer).
    mean_plays_per_user: float = 30.0
    songs_per_artist: int = 8
    audio: bool = True
    audio_format: Literal["mp3", "ogg", "flac", "wav"] = "mp3"
    clip_seconds: float = 30.0
    sample_rate: int = 44100
    # "none" with audio=false is the plays-only mode (Taste Profile scale: triplets + tracks).
    lastfm_format: Literal["json", "db", "both", "none"] = "json"
    mismatch_fraction: float = 0.01
    # Real Last.fm quirks: a share of tagged tracks carries one tag of weight 0, and the
    # lastfm_tags.db gets tid_tag rows whose track or tag id has no row.
    zero_weight_tag_fraction: float = Field(0.1, ge=0.0, le=1.0)
    dangling_tag_rows: int = Field(0, ge=0)
    gtzan_per_genre: int = 10
    # Clips per synthetic artist in the GTZAN-layout set (groups.csv names each clip's artist;
    # the artist's clips share key, mode, timbre and swing). 1: every clip drawn on its own.
    gtzan_clips_per_artist: int = Field(1, ge=1)
    mtat_clips: int = 100
    workers: int | None = None


class IngestConfig(_Section):
    # Bytes per Spark task when splitting large line-oriented files.
    chunk_bytes: int = 64 * 1024 * 1024
    # A line longer than this is quarantined as line_too_long and never read whole (one giant
    # line must not exhaust a task); real track-list and triplet lines are ~100 bytes.
    max_line_bytes: int = Field(1 << 20, ge=64)
    # Objects under the audio prefix with these extensions are not audio (cover art, text,
    # playlists): quarantined as unsupported_format without being read. Any other object is a
    # candidate and its content decides (an unknown extension is decoded like any other).
    non_audio_extensions: tuple[str, ...] = (
        ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".pdf", ".txt", ".md", ".nfo", ".log",
        ".cue", ".m3u", ".m3u8", ".pls", ".json", ".xml", ".html", ".htm", ".csv", ".tsv", ".db", ".zip", ".gz",
        ".tar", ".7z", ".rar", ".exe", ".sfv", ".md5", ".sha256", ".ds_store", ".ini")
    # Fail the job when more than this fraction of input records is quarantined.
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)


class SpectrogramConfig(_Section):
    """Log-mel settings (the papers': 22,050 Hz mono, window 1024, hop 512, 128 bands,
    log(1 + 10,000·x)) and how the stage runs.

    The settings fields mirror :class:`~deepcontent.audio.settings.MelSettings` one for one and
    take its defaults; :meth:`mel_settings` is the only conversion (a test checks the mirror)."""

    sample_rate: int = _MEL.sample_rate
    n_fft: int = _MEL.n_fft
    hop_length: int = _MEL.hop_length
    n_mels: int = _MEL.n_mels
    fmin: float = _MEL.fmin
    # None = sample_rate / 2
    fmax: float | None = _MEL.fmax
    compression: float = _MEL.compression
    hpss: bool = _MEL.hpss
    # Longer audio is quarantined as too_long (decided from the header, before decoding).
    max_seconds: float = _MEL.max_seconds
    # A clip that decodes less than this share of its header's duration is quarantined as truncated.
    min_decoded_fraction: float = _MEL.min_decoded_fraction
    # Objects larger than this are quarantined as too_long without being read (memory bound).
    max_audio_bytes: int = 256 * 1024 * 1024
    clips_per_task: int = Field(64, ge=1)
    decode_timeout_s: float = Field(60.0, gt=0)
    decoder_memory_mb: int = 4096
    # Runs in a row that may fail a clip for a transient reason (timeout, crashed, unreadable)
    # before it stays quarantined until its audio changes.
    max_attempts: int = Field(3, ge=1)
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # The function run in the isolated decoder process ("module:function").
    compute_fn: str = "deepcontent.audio.features:compute_log_mel"

    @model_validator(mode="after")
    def _valid_settings(self) -> "SpectrogramConfig":
        self.mel_settings()  # MelSettings checks every field and names the bad one
        return self

    def mel_settings(self) -> MelSettings:
        """The :class:`MelSettings` these fields describe."""
        return MelSettings(**{name: getattr(self, name) for name in MEL_FIELDS})

    def frames(self, seconds: float) -> int:
        """Spectrogram frames spanning ``seconds`` of audio at this sample rate and hop."""
        return max(1, round(seconds * self.sample_rate / self.hop_length))


class MatricesConfig(_Section):
    split_seed: int = 0
    # train / valid / test shares of songs (or artists with split_level=artist)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_level: Literal["song", "artist"] = "song"
    # tags must occur on at least this many distinct songs (the papers: more than once)
    min_tag_count: int = Field(2, ge=1)
    # tags weighted below this stay in the canonical tags (they are in the data) but not in the
    # tag matrix (Last.fm publishes weight 0 for tags that barely apply)
    min_tag_weight: int = Field(1, ge=0, le=100)
    # counts above this are "absurd" (a bot or a logging bug) and quarantined
    max_play_count: int = Field(100_000, ge=1)
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)


class FactorizeConfig(_Section):
    """WMF (implicit ALS): c = 1 + alpha·log(1 + r/eps), objective of Hu, Koren & Volinsky."""

    backend: Literal["implicit", "spark", "reference"] = "implicit"
    # The matrices to factorise, in order: "plays" (users × songs: the CNN's targets) and
    # "tags" (songs × tags: the tag source task; skipped when the catalog has no tags).
    matrices: tuple[Literal["plays", "tags"], ...] = ("plays", "tags")
    factors: int = Field(50, ge=1)
    # Factors of the tag WMF (matrix=tags); None: ``factors``. A vocabulary smaller than the
    # factor count is reproduced exactly by the fold-in, which makes the tag task's upper bound
    # meaningless, so small catalogs want fewer.
    tag_factors: int | None = Field(None, ge=1)
    iterations: int = Field(15, ge=1)
    regularization: float = Field(0.1, ge=0.0)
    alpha: float = Field(2.0, gt=0.0)
    eps: float = Field(1.0, gt=0.0)
    seed: int = 0
    # 0 = all cores (implicit)
    num_threads: int = 0


class TrainConfig(_Section):
    """The ``train`` stage: a CNN regressor from log-mel windows (or, with ``input=waveform``,
    raw-audio windows) to WMF item factors, on Ray Train (one DDP worker per ``num_workers``)
    fed by Ray Data from the clip shards.

    Targets are the item factors of train songs (``targets``: the listening WMF by default, or
    the tag WMF), standardised per factor; valid songs give the validation NMSE (early
    stopping). Only a log-mel model of the listening factors becomes the production model that
    ``embed`` uses; other kinds are registered without promotion. Hardware is configuration only: ``use_gpu``
    picks NCCL, bf16 autocast (``precision=auto``) and pinned host memory in one place
    (:mod:`deepcontent.train.backend`); CPU workers use gloo and ``threads_per_worker`` threads.
    """

    model: Literal["paper_cnn", "deep_cnn", "raw_audio"] = "paper_cnn"
    # What the net reads: the stored log-mel spectrograms, or mono waveforms at
    # spectrograms.sample_rate (``features/waveforms``, written by the waveforms stage) for the
    # raw-audio front end (thesis ch. 5). ``window_frames`` counts samples for waveforms.
    input: Literal["log_mel", "waveform"] = "log_mel"
    # Regression targets: the item factors of the listening WMF ("plays") or of the tag WMF
    # ("tags", the ISMIR 2014 tag source task; needs ``factorize.matrix=tags`` to have run).
    targets: Literal["plays", "tags"] = "plays"
    # Keyword arguments of the model class (see deepcontent.models); n_factors and the window
    # length come from the data and ``window_frames``.
    model_params: dict[str, Any] = Field(default_factory=dict)
    loss: Literal["mse", "wpe"] = "mse"
    # ~3 s at 22,050 Hz / hop 512 (thesis §4.5.2). With ``window_seconds`` set, the window is
    # derived from it and the spectrogram hop instead (samples for waveform input).
    window_frames: int = Field(130, ge=8)
    window_seconds: float | None = Field(None, gt=0)
    # Random windows cropped per train clip per epoch (the epoch's length).
    windows_per_clip: int = Field(4, ge=1)
    # Per worker; the global batch is batch_size × num_workers.
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(30, ge=1)
    # Stop after this many epochs without a better validation NMSE.
    patience: int = Field(5, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    # Random gain augmentation, ± dB of mel power per window (0 = off).
    gain_db: float = Field(0.0, ge=0.0)
    seed: int = 0
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    # torch intra-op threads per worker (1 per worker on CPU: see the performance notes of docs/architecture.md).
    threads_per_worker: int = Field(1, ge=1)
    # "auto" = bf16 autocast on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Ray Data ingest tasks (read a shard, attach targets): CPUs each and how many at once.
    # 0 CPUs by default: Ray Data only gets the cluster's CPUs minus the training workers', none
    # on a machine whose cores are all training workers; ingest runs while the workers wait.
    ingest_cpus: float = Field(0.0, ge=0.0)
    ingest_concurrency: int = Field(2, ge=1)
    # Windows per forward pass when scoring whole clips (validation).
    eval_batch_size: int = Field(256, ge=1)
    # Bytes of clips (float16 frames, padded to a window, plus targets) one worker may hold at
    # once, shared between its train and valid clips in proportion to the two splits' sizes. A
    # split whose shard fits its share stays resident (pulled once: the fast path); a larger one
    # is spilled to local disk (``spill_dir``) as it streams in and read back every epoch a fill
    # at a time (row groups in a seeded random order, two fills of half the share each: one
    # training, one being read). 4 GiB ≈ 13,000 clips of 30 s × 128 bands; a catalog of 1M × 10 s
    # clips is ≈ 110 GB (see docs/architecture.md, training memory).
    cache_bytes: int = Field(4 * 2**30, ge=2)
    # Local directory for a worker's clips beyond cache_bytes (None = the system temp dir; on
    # Kubernetes an emptyDir volume with room for the worker's share of the catalog).
    spill_dir: str | None = None
    prefetch_batches: int = Field(2, ge=0)
    # Worker failures a run recovers from (from its latest checkpoint) before it fails.
    max_failures: int = Field(2, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)
    # Also fit the BoW-MFCC + linear baseline on the same split and record its NMSE.
    baseline: bool = False
    # BoW vocabulary sizes tried (with a grid of ridge penalties); the best on valid is reported.
    baseline_words: tuple[Annotated[int, Field(ge=2)], ...] = (32, 64, 128, 256, 512)
    # "module:function" called on every worker after each epoch's report as
    # fn(epoch=, rank=, attempt=); a hook for fault-injection tests, None in production.
    epoch_hook: str | None = None
    # Model variants the stage trains besides the production model, by name (see
    # deepcontent.train.variants: cnn_mse, cnn_wpe, deep_cnn, raw_cnn, cnn_tags). Each is
    # registered under models/variants/<name>.json and never promoted. The pipeline adds the
    # variants its evaluation needs.
    variants: tuple[str, ...] = ()
    # Set by the stage on a variant's own config: the name it registers under.
    variant: str | None = None
    # Start from a pretrained network (`deepcontent pretrain`): a model version, or a variant
    # name such as "pretrained" (the last pretrain run), in init_registry_root (another catalog's
    # root on the same store, e.g. the real-audio corpus's) or this catalog's registry. Its
    # architecture and window must match; its output layer (a projection) is not loaded.
    init_from: str | None = None
    init_registry_root: str | None = None
    # With init_from: the learning rate of the pretrained layers as a fraction of ``lr`` (the
    # output layer, new, keeps ``lr``). Below 1 the backbone moves less from what it learned;
    # 1 = every layer alike. No effect on a run without init_from.
    init_lr_scale: float = Field(1.0, gt=0.0, le=1.0)

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from deepcontent.train.variants import VARIANTS

        unknown = [name for name in v if name not in VARIANTS]
        if unknown:
            raise ValueError(f"train.variants {unknown} are not model variants; known: {', '.join(VARIANTS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if (self.model == "raw_audio") != (self.input == "waveform"):
            raise ValueError(f"train.model={self.model!r} with train.input={self.input!r}: the raw_audio model reads "
                             f"waveforms and the spectrogram models read log-mels")
        if self.input == "waveform" and (self.gain_db > 0 or self.baseline):
            raise ValueError("train.gain_db and train.baseline work on log-mels; set them to 0 / false with "
                             "train.input=waveform")
        if self.loss == "wpe" and self.targets != "plays":
            raise ValueError("train.loss=wpe needs train.targets=plays (WPE weighs errors by the users' plays)")
        return self


class PretrainConfig(_Section):
    """The ``pretrain`` stage: self-supervised pretraining of a backbone on every clip of the
    catalog, played or not (contrastive: two windows of a track are positives, the other
    tracks in the batch negatives; InfoNCE). Same data path, Ray Train set-up, checkpoints and
    registry as ``train``; the model registers under ``models/variants/pretrained.json`` and a
    train run starts from it with ``train.init_from=pretrained``."""

    # The backbone: a train model whose output layer is the projection head here.
    model: Literal["paper_cnn", "deep_cnn"] = "paper_cnn"
    model_params: dict[str, Any] = Field(default_factory=dict)
    # Must equal train.window_frames for the backbone to initialise train's model.
    window_frames: int = Field(130, ge=8)
    projection_dim: int = Field(128, ge=2)
    temperature: float = Field(0.1, gt=0.0)
    # Augmentations, each view drawn on its own: random gain (± dB of mel power) and
    # SpecAugment-style time / frequency masks (this many spans of up to this many frames / bands,
    # set to silence).
    gain_db: float = Field(6.0, ge=0.0)
    time_masks: int = Field(2, ge=0)
    time_mask_frames: int = Field(20, ge=0)
    freq_masks: int = Field(2, ge=0)
    freq_mask_bands: int = Field(16, ge=0)
    # Tracks held out (by a hash of the track id) to score the objective each epoch.
    valid_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # Window pairs drawn per held-out track to score it (the same draws every epoch): a held-out
    # share of a small catalog is a few dozen tracks, and one pair each makes early stopping
    # follow the draw rather than the backbone.
    valid_pairs: int = Field(8, ge=1)
    windows_per_clip: int = Field(4, ge=1)
    batch_size: int = Field(64, ge=2)
    epochs: int = Field(20, ge=1)
    patience: int = Field(5, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = 0
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    threads_per_worker: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    cache_bytes: int = Field(4 * 2**30, ge=2)
    spill_dir: str | None = None
    max_failures: int = Field(2, ge=-1)
    checkpoints_to_keep: int = Field(2, ge=1)
    ingest_cpus: float = Field(0.0, ge=0.0)
    ingest_concurrency: int = Field(2, ge=1)
    prefetch_batches: int = Field(2, ge=0)
    # "module:function" called on every worker after each epoch (fault-injection tests).
    epoch_hook: str | None = None
    # What the catalog is, recorded with the model ("debian-game-music", ...); None = its root.
    corpus: str | None = None

    def train_config(self) -> "TrainConfig":
        """The loop settings as a TrainConfig (the train loop runs both stages)."""
        shared = {k: getattr(self, k) for k in (
            "model", "model_params", "window_frames", "windows_per_clip", "batch_size", "epochs", "patience", "lr",
            "weight_decay", "gain_db", "seed", "num_workers", "use_gpu", "cpus_per_worker", "threads_per_worker",
            "precision", "cache_bytes", "spill_dir", "max_failures", "checkpoints_to_keep", "ingest_cpus",
            "ingest_concurrency", "prefetch_batches", "epoch_hook")}
        return TrainConfig(**shared, eval_batch_size=self.batch_size)


class EmbedConfig(_Section):
    """The ``embed`` stage: Ray Data batch inference with a registered model over the
    spectrogram shards -> one ``predicted_factors`` and one ``embedding`` vector per track.

    Each actor loads the model once; ``use_gpu`` gives each actor one GPU (bf16 autocast under
    ``precision=auto``), otherwise ``cpus_per_actor`` CPUs and ``threads_per_actor`` torch threads.
    """

    # None = the production model (models/production.json).
    model_version: str | None = None
    # The storage root whose model registry embed, neighbors and nightly load from (same store
    # and credentials); None = storage.root. Another catalog's root embeds this catalog with a
    # model trained there (an audio-only catalog has no plays to train one).
    registry_root: str | None = None
    actors: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_actor: float = Field(1.0, gt=0.0)
    threads_per_actor: int = Field(1, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Clips per actor call, and windows per forward pass inside it.
    clips_per_batch: int = Field(32, ge=1)
    windows_per_forward: int = Field(256, ge=1)
    # Runs with at most this many clips to embed skip Ray and embed in the driver process (a
    # nightly run with a few new tracks); 0 = always Ray Data.
    in_process_max_clips: int = Field(64, ge=0)
    # Fail the run when more than this fraction of clips give non-finite outputs.
    max_quarantine_fraction: float = Field(0.05, ge=0.0, le=1.0)
    # "module:function" called as fn(run_id=, staged=) after the actors wrote their files and
    # before the commit; a hook for fault-injection tests, None in production.
    before_commit_hook: str | None = None


class NeighborsConfig(_Section):
    """The ``neighbors`` stage: top-k cosine neighbours per track over one model version's vectors."""

    k: int = Field(10, ge=1)
    # Which vector defines similarity: the predicted WMF factors (listening-behaviour space, as
    # in the papers' neighbour tables) or the penultimate-layer embedding.
    vector: Literal["predicted_factors", "embedding"] = "predicted_factors"
    # Query rows per blocked matrix product (memory is block_rows × n_tracks floats).
    block_rows: int = Field(2048, ge=1)
    # Exact search up to this many tracks (n² d work: ~10 s at 50k × 50-d); beyond it an
    # approximate faiss index (see deepcontent.embed.ann).
    exact_max_tracks: int = Field(50_000, ge=2)
    # The approximate index beyond exact_max_tracks: hnsw (graph, no training) or ivf (k-means
    # cells); "exact" forces exact search at any size.
    index: Literal["hnsw", "ivf", "exact"] = "hnsw"
    # Overrides of the index's parameters (hnsw: m, ef_construction, ef_search; ivf: nlist,
    # nprobe, train_size); the rest keep deepcontent.embed.ann.default_params.
    index_params: dict[str, int] = Field(default_factory=dict)
    # Every approximate run searches this many seeded queries exactly too, and fails (commits
    # nothing) when recall@k against them is below min_recall.
    min_recall: float = Field(0.95, ge=0.0, le=1.0)
    recall_queries: int = Field(2000, ge=1)
    # Below min_recall on that sample, the search effort (hnsw ef_search, ivf nprobe) doubles
    # before the full search, up to this multiple of the configured one (how hard vectors are to
    # index depends on the catalog); 1 never raises it.
    max_search_effort: int = Field(8, ge=1)
    seed: int = 0
    # Query the index in this many Ray tasks (the index and the vectors go to the object store
    # once; each task searches a range of rows), spreading the search over a cluster's cores;
    # 0 searches in this process (faiss uses every core here).
    query_tasks: int = Field(0, ge=0)
    cpus_per_task: float = Field(2.0, gt=0)
    # Export the index per model version to <root>/indexes/<model_version>/ (index.faiss,
    # ids.parquet, and its parameters and measured recall in the published pointer).
    export_index: bool = True
    # Nightly runs update the last exported index and search again only the lists that can
    # change (deepcontent.embed.neighbor_update) instead of rebuilding and searching every track;
    # a full search when more than max_incremental_fraction of the tracks were added, changed or
    # removed, when dead rows would exceed rebuild_dead_fraction of the index, or when the
    # updated lists miss min_recall. reverse_candidates: nearest tracks searched around each
    # added vector to find the lists it enters.
    incremental: bool = True
    max_incremental_fraction: float = Field(0.2, ge=0.0, le=1.0)
    rebuild_dead_fraction: float = Field(0.2, ge=0.0, le=1.0)
    reverse_candidates: int = Field(100, ge=1)


class MaintainConfig(_Section):
    """The ``maintain`` stage: compaction and snapshot expiry of the Iceberg tables."""

    # Tables to maintain (default: every warehouse table that exists).
    tables: tuple[str, ...] = ()
    # Snapshots older than this (beyond the last retain_last) are expired: time travel reaches
    # back this far, and a reader that planned on an older snapshot has this long to finish.
    older_than_hours: float = Field(72.0, ge=0.0)
    retain_last: int = Field(5, ge=1)
    # Compact a partition whose position deletes mask at least this fraction of its rows, or
    # that holds at least min_files data files (each nightly adds about one per partition).
    min_deleted_fraction: float = Field(0.1, ge=0.0, le=1.0)
    min_files: int = Field(8, ge=2)


class NightlyConfig(_Section):
    """The ``nightly`` job: ingest -> spectrograms -> embed -> neighbors for what changed."""

    # Stages the nightly run covers, in order: incremental stages of the registry
    # (deepcontent.stages.STAGES).
    stages: tuple[str, ...] = ("ingest", "spectrograms", "embed", "neighbors", "maintain")

    @field_validator("stages")
    @classmethod
    def _incremental(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from deepcontent.stages import STAGES

        allowed = [s.name for s in STAGES.values() if s.incremental]
        bad = [s for s in v if s not in allowed]
        if bad:
            raise ValueError(f"nightly.stages {list(bad)} are not incremental stages; choose from {allowed}")
        return v


class EvaluateConfig(_Section):
    """The ``evaluate`` stage: the papers' cold-start protocol on the test songs, source-task
    NMSE, transfer to the GTZAN-layout set, and the HTML report."""

    # Methods in display order. CNN variants train (or reuse) a registered model of their own
    # without promoting it: cnn_mse / cnn_wpe = the paper CNN with that loss, deep_cnn = the
    # deeper CNN (MSE).
    # raw_cnn = the raw-audio front end + paper CNN (MSE), trained on mono waveforms.
    # cnn_finetuned = the paper CNN (MSE) started from the pretrained backbone (train.init_from);
    # pretrained_linear = ridge from that backbone's penultimate layer, the backbone itself frozen.
    methods: tuple[Literal["random", "bow_linear", "bow_mlp", "kmeans_linear", "cnn_mse", "cnn_wpe",
                           "deep_cnn", "raw_cnn", "cnn_finetuned", "pretrained_linear", "upper_bound"], ...] = (
        "random", "bow_linear", "bow_mlp", "kmeans_linear", "cnn_mse", "cnn_wpe", "upper_bound")
    map_k: int = Field(500, ge=1)
    ndcg_k: int = Field(10, ge=1)
    recall_k: int = Field(50, ge=1)
    # Spherical K-means dictionary size (the paper's 2,048 needs far more clips than a demo has).
    kmeans_centroids: int = Field(2048, ge=2)
    mlp_epochs: int = Field(30, ge=1)
    # Transfer: 10-fold nested-CV linear SVM accuracy on the GTZAN-layout folder, CNN features
    # vs spherical K-means features.
    transfer: bool = True
    transfer_folds: int = Field(10, ge=2)
    # Harmonic / percussive / original late fusion on the GTZAN-layout set (ISMIR 2014 option):
    # features of each component's log-mel, one SVM per component, decision scores averaged.
    late_fusion: bool = False
    # Source task "tags": WMF on songs × tags (run here when missing), regressors from audio to
    # the tag factors, tag-prediction AUC / mAP of A′ = U′Vᵀ over the test songs.
    tag_prediction: bool = True
    # Regressors of tag factors, among bow_linear, kmeans_linear, cnn_tags (the paper CNN on the
    # tag factors), random and upper_bound (test songs folded in from their own tags).
    tag_methods: tuple[Literal["random", "bow_linear", "kmeans_linear", "cnn_tags", "upper_bound"], ...] = (
        "random", "bow_linear", "kmeans_linear", "cnn_tags", "upper_bound")
    seed: int = 0
    # The pretrained backbone of cnn_finetuned / pretrained_linear: a version or variant name
    # ("pretrained": the last `deepcontent pretrain`) in pretrained_registry_root (the catalog it
    # was pretrained on, e.g. the real-audio corpus) or this catalog's registry.
    pretrained_model: str = "pretrained"
    pretrained_registry_root: str | None = None
    # Repeated runs for error bars (`deepcontent evaluate --seeds 3` = [0, 1, 2]): per seed the
    # cold-start WMF, every regressor and every CNN variant are refitted with that seed on the
    # same song split, and the cold-start table reports mean ± sd over seeds. The catalog itself
    # serves the seed its factorize / train / evaluate seeds all equal; every other seed is a
    # replicate under <root>/replicates/seed-<s>/ (its own factors, models and runs, reading
    # this catalog's inputs; its own warehouse namespace). Empty: one run at the configured seeds.
    seeds: tuple[int, ...] = ()
    # With seeds: every method minus this one, seed by seed (mean ± sd of the paired
    # differences: the error bar of "beats the CNN from scratch"); skipped when not in methods.
    seeds_reference: str = "cnn_mse"
    # Where a copy of metrics.json and report.html goes on the local disk (also written to
    # <root>/evaluate/<run_id>/ in object storage).
    report_dir: str = ".deepcontent/report"


class TransferConfig(_Section):
    """``deepcontent transfer``: genre-style transfer on any GTZAN-layout folder
    (``<label>/<clip>``, any codec the decoder reads, any length), without a catalog.

    Per feature set — every registered listening model's predicted factors and penultimate
    layer, spherical K-means fitted on the folder's training folds only, log-mel statistics,
    MFCC statistics — a linear SVM by nested cross-validation, stratified over clips and grouped
    over artists / albums / sources, and a 1-NN accuracy across groups."""

    # The folder: a local path or a URI the storage reads (s3://…, file://…); None = the
    # generated GTZAN-layout set (sources.gtzan under the raw prefix). `deepcontent transfer DIR`.
    folder: str | None = None
    # Listening models whose features are compared: "all" (production + every registered
    # variant trained on plays, when there are any), "production", "none" (the fixed-feature
    # baselines alone: nothing is read from the model registry), a variant name (cnn_wpe) or a
    # model version (paper_cnn-…). `--model`.
    model: str = "all"
    # The grouping of the clips: a CSV of `path,group` (path relative to the folder; a local
    # path or a URI), or the folder level that names the group (2: <label>/<group>/<clip>).
    # Neither: the folder's own groups.csv when it has one, else no grouped numbers.
    # `--groups FILE`, `--group-level 2`.
    groups_file: str | None = None
    group_level: int | None = Field(None, ge=2)
    # Fixed-length excerpts from the middle of each track (seconds; None = the whole track),
    # several per track with their features averaged (30 s × 1 = a GTZAN clip as it is).
    excerpt_seconds: float | None = Field(30.0, gt=0)
    excerpts_per_track: int = Field(1, ge=1)
    # Feature sets: models (as `model` says), kmeans, logmel_stats, mfcc_stats.
    features: tuple[Literal["models", "kmeans", "logmel_stats", "mfcc_stats"], ...] = (
        "models", "kmeans", "logmel_stats", "mfcc_stats")
    # Stratified outer / inner folds (fewer when the smallest class has fewer clips; the numbers
    # used are in the output). The grouped protocol's inner loop is grouped too.
    folds: int = Field(10, ge=2)
    inner_folds: int = Field(5, ge=2)
    # Grouped protocol: leave-one-group-out up to max_logo_groups groups, else a stratified
    # grouped k-fold with grouped_folds folds.
    grouped_folds: int = Field(10, ge=2)
    max_logo_groups: int = Field(30, ge=2)
    # Spherical K-means dictionary size (at most one centroid per 8 training frames).
    kmeans_centroids: int = Field(512, ge=2)
    seed: int = 0
    # Where a copy of metrics.json and report.html goes on the local disk (also written to
    # <root>/transfer/<run_id>/ in object storage).
    report_dir: str = ".deepcontent/transfer"

    @model_validator(mode="after")
    def _one_grouping(self) -> "TransferConfig":
        if self.groups_file is not None and self.group_level is not None:
            raise ValueError(f"transfer.groups_file={self.groups_file!r} and transfer.group_level={self.group_level} "
                             f"are two groupings; give one")
        if not self.model.strip():
            raise ValueError("transfer.model is empty; give all, production, none, a variant name or a model version")
        return self


class Config(_Section):
    run_name: str = "deepcontent"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    warehouse: WarehouseConfig = Field(default_factory=WarehouseConfig)
    spark: SparkConfig = Field(default_factory=SparkConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    spectrograms: SpectrogramConfig = Field(default_factory=SpectrogramConfig)
    matrices: MatricesConfig = Field(default_factory=MatricesConfig)
    factorize: FactorizeConfig = Field(default_factory=FactorizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    neighbors: NeighborsConfig = Field(default_factory=NeighborsConfig)
    maintain: MaintainConfig = Field(default_factory=MaintainConfig)
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)

    @model_validator(mode="after")
    def _window_from_seconds(self) -> "Config":
        tc = self.train
        if tc.window_seconds is not None:
            sc = self.spectrograms
            frames = (round(tc.window_seconds * sc.sample_rate) if tc.input == "waveform"
                      else sc.frames(tc.window_seconds))
            if frames != tc.window_frames:
                tc.window_frames = frames
        return self

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none), secrets excluded.

        Used in run manifests and to decide whether a stage has anything new to do."""
        data = self.public_dict()
        if sections:
            data = {k: data[k] for k in sections}
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data with every secret replaced by ``"***"`` (or None): the
        S3 keys, any secret-looking key of ``warehouse.properties`` or ``spark.conf``, URL
        passwords (:func:`deepcontent.redact.redact`)."""
        data = self.model_dump(mode="json")
        for key in ("access_key_id", "secret_access_key"):
            if data["storage"].get(key) is not None:
                data["storage"][key] = "***"
        return redact(data)


def _repo_conf_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "conf"


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _load_file_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config 'extends' cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents:
        merged = _deep_merge(merged, _load_file_chain((path.parent / parent), seen + (path,)))
    return _deep_merge(merged, data)


# Free-form string maps whose own keys contain dots (``spark.conf.spark.ui.enabled=false``).
_STRING_MAPS = (("spark", "conf"), ("warehouse", "properties"))


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"bad override key {dotted!r}: empty path segment")
    for prefix in _STRING_MAPS:
        if tuple(keys[: len(prefix)]) == prefix and len(keys) > len(prefix):
            keys = [*prefix, ".".join(keys[len(prefix):])]
            value = str(value).lower() if isinstance(value, bool) else str(value)
    node = data
    for key in keys[:-1]:
        nxt = node.setdefault(key, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key.path=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(out, key.strip(), value)
    return out


def _env_overrides(environ: dict[str, str]) -> dict:
    pairs = []
    for name, raw in environ.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
            pairs.append(f"{dotted}={raw}")
    return parse_overrides(pairs)


def load_config(
    path: str | os.PathLike | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    environ: dict[str, str] | None = None,
    base: str | os.PathLike | None = None,
) -> Config:
    """Load ``base.yaml`` + ``path`` + environment + overrides into a :class:`Config`.

    ``path=None`` loads the embedded default (``conf/local.yaml``)."""
    conf_dir = _repo_conf_dir()
    base_path = Path(base) if base is not None else conf_dir / "base.yaml"
    data = _read_yaml(base_path) if base_path.exists() else {}
    data.pop("extends", None)
    chosen = Path(path) if path is not None else conf_dir / "local.yaml"
    if chosen.resolve() != base_path.resolve():
        data = _deep_merge(data, _load_file_chain(chosen))
    env = dict(os.environ if environ is None else environ)
    data = _deep_merge(data, _env_overrides(env))
    data = _deep_merge(data, parse_overrides(list(overrides)))
    _register_secrets(data, env)
    try:
        return Config.model_validate(data)
    except Exception as exc:  # pydantic's message names the field and the bad value (never a secret's)
        raise ConfigError(redact_text(f"invalid configuration ({chosen}): {exc}")) from None


def _register_secrets(data: Any, env: dict[str, str]) -> None:
    """Register every secret the config or the environment holds with :mod:`deepcontent.redact`:
    values under secret-looking keys (whatever their type: a numeric one too), passwords in URLs,
    the ``AWS_*`` keys and the catalog password variable."""
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if looks_secret(key) and not isinstance(value, (dict, list)):
                    register_secret(value.get_secret_value() if isinstance(value, SecretStr) else value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and "://" in node and "@" in node:
            from urllib.parse import urlsplit

            try:
                register_secret(urlsplit(node).password)
            except ValueError:
                pass

    walk(data)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        register_secret(env.get(name))
    password_env = (data.get("warehouse") or {}).get("catalog_password_env") if isinstance(data, dict) else None
    if password_env:
        register_secret(env.get(str(password_env)))
