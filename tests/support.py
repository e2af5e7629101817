"""Helpers shared by test modules (importable as ``support`` through pytest's pythonpath)."""

from deepcontent.config import load_config
from deepcontent.storage import Storage


def config_for(storage: Storage, tmp_path, **overrides):
    """The embedded-default config re-pointed at ``storage`` (no server of its own)."""
    pairs = [f"storage.root={storage.root}", "storage.embedded_s3=false",
             f"warehouse.uri=sqlite:///{tmp_path}/catalog.db"]
    pairs += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, overrides=pairs, environ={})


def run_stage(name: str, cfg, storage: Storage, spark=None):
    """Run the registered stage ``name`` as the CLI would, on ``storage`` with the test's Spark
    session (never stopped here); the stage's warehouse (and Ray, if it started it) is closed after."""
    from deepcontent.stages import STAGES, StageContext

    ctx = StageContext(cfg, storage, spark=spark)
    try:
        return STAGES[name].runner()(cfg, ctx)
    finally:
        ctx.close()


def context(cfg, storage: Storage, spark=None):
    """A :class:`~deepcontent.stages.StageContext` on ``storage`` with the test's Spark session."""
    from deepcontent.stages import StageContext

    return StageContext(cfg, storage, spark=spark)
