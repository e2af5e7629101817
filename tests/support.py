"""Helpers shared by test modules (importable as ``support`` through pytest's pythonpath)."""

from deepcontent.config import load_config
from deepcontent.storage import Storage


def config_for(storage: Storage, tmp_path, **overrides):
    """The embedded-default config re-pointed at ``storage`` (no server of its own)."""
    pairs = [f"storage.root={storage.root}", "storage.embedded_s3=false",
             f"warehouse.uri=sqlite:///{tmp_path}/catalog.db"]
    pairs += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, overrides=pairs, environ={})
