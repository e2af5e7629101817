"""The stages of deepcontent, one module each, all of one shape::

    from deepcontent.stages import STAGES, StageContext

    with StageContext.open(cfg) as ctx:            # storage (+ embedded S3), engines on demand
        result = STAGES["ingest"].runner()(cfg, ctx)   # -> StageResult

Every stage module ``deepcontent.stages.<name>`` has ``run(cfg, ctx) -> StageResult``. The
registry below is the one list of stages: the CLI builds its subcommands from it, ``submit``
picks spark-submit or ``ray job submit`` from :attr:`Stage.engine`, ``jobs/<name>.py`` is the
cluster entry point of each, and the pipeline runs :data:`PIPELINE` in order. Stages read and
write only through :class:`StageContext` (storage, warehouse, engines) and the declarations of
:mod:`deepcontent.datasets`; the maths they call lives in the domain packages (``audio``,
``interactions``, ``factorize``, ``models``, ``train``, ``embed``, ``evaluate``), which never
import a stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

from deepcontent.stages.base import StageContext, StageResult, StageRun

if TYPE_CHECKING:
    from deepcontent.config import Config

__all__ = ["PIPELINE", "STAGES", "Stage", "StageContext", "StageResult", "StageRun", "run_stage"]


@dataclass(frozen=True)
class Stage:
    """One registered stage.

    Attributes
    ----------
    name : str
        Its CLI subcommand, module (``deepcontent.stages.<name>``) and job file
        (``jobs/<name>.py``).
    engine : {"spark", "ray"}
        How ``deepcontent submit`` runs it on a cluster: ``spark-submit`` or ``ray job submit``.
    summary : str
        One line for ``--help``.
    incremental : bool
        Re-running it with nothing new publishes nothing, so ``nightly`` may run it.
    in_pipeline : bool
        Part of ``deepcontent pipeline`` (the nightly job is not: it runs other stages).
    """

    name: str
    engine: Literal["spark", "ray"]
    summary: str
    incremental: bool = False
    in_pipeline: bool = True

    def runner(self) -> Callable[["Config", StageContext], StageResult]:
        """The stage's ``run(cfg, ctx)`` (its module is imported on first use)."""
        return importlib.import_module(f"deepcontent.stages.{self.name}").run


#: Every stage, in pipeline order.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", "spark", "Spark: raw catalog -> canonical tracks, plays, tags and quarantine datasets",
          incremental=True),
    Stage("spectrograms", "spark", "Spark: audio clips -> float16 log-mel shards (incremental, with quarantine)",
          incremental=True),
    Stage("matrices", "spark", "Spark: plays and tags -> stable id maps, song splits, sparse matrices (COO + CSR)"),
    Stage("factorize", "spark", "WMF / implicit ALS on the train split (plays, and tags when the catalog has "
                                "them) -> latent factors"),
    Stage("waveforms", "spark", "Spark: audio of the split songs -> mono waveforms for the raw-audio CNN "
                                "(run by the pipeline when a model reads them)"),
    Stage("train", "ray", "Ray Train: CNN from log-mel windows to item factors (DDP, checkpoints, early "
                          "stopping), and its variants -> model registry"),
    Stage("pretrain", "ray", "Ray Train: self-supervised (contrastive) pretraining of a CNN backbone on every clip, "
                             "played or not -> registry (train.init_from=pretrained fine-tunes it)", in_pipeline=False),
    Stage("embed", "ray", "Ray Data: registered model over the spectrograms -> Iceberg embeddings "
                          "(incremental, one commit per run)", incremental=True),
    Stage("neighbors", "ray", "top-k cosine neighbours over the embeddings -> Iceberg similar_tracks",
          incremental=True),
    Stage("evaluate", "ray", "cold-start metrics (mAP@500, AUC, NDCG@10, recall@50) per method, transfer to "
                             "GTZAN / MTAT layouts, HTML report"),
    Stage("transfer", "ray", "genre transfer on any GTZAN-layout folder (DIR or URI): every listening model's "
                             "features and fixed-feature baselines, linear SVM by nested CV stratified and grouped "
                             "(artist / album), 1-NN across groups", in_pipeline=False),
    Stage("maintain", "ray", "compact Iceberg partitions holding position deletes or small files; expire old "
                             "snapshots (no commit when nothing needs it)", incremental=True, in_pipeline=False),
    Stage("nightly", "spark", "ingest -> spectrograms -> embed -> neighbors -> maintain for new or changed tracks "
                              "with the production model; run summary", in_pipeline=False),
)}

#: The stages ``deepcontent pipeline`` runs, in order.
PIPELINE: tuple[str, ...] = tuple(name for name, s in STAGES.items() if s.in_pipeline)


def run_stage(name: str, cfg: "Config", ctx: StageContext) -> StageResult:
    """Run the registered stage ``name`` with ``cfg`` on ``ctx``."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name].runner()(cfg, ctx)
