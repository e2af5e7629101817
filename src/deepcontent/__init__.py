"""deepcontent: content-based music embeddings at catalog scale.

The batch system is the ``deepcontent`` command (:mod:`deepcontent.cli`) and its stages
(:mod:`deepcontent.stages`); to embed audio from Python::

    import deepcontent
    model = deepcontent.load_model(storage="s3://bucket/deepcontent")
    out = deepcontent.embed_audio(["a.flac", "b.m4a"], model=model)
"""

__version__ = "0.1.0"

__all__ = ["__version__", "embed_audio", "load_model"]


def __getattr__(name: str):
    # torch and the decoders load on first use, not on ``import deepcontent``
    if name in ("load_model", "embed_audio"):
        from deepcontent import api

        return getattr(api, name)
    raise AttributeError(f"module 'deepcontent' has no attribute {name!r}")
