"""Batch inference (``embed``) and nearest neighbours (``neighbors``) over the spectrograms.

* :mod:`deepcontent.embed.pooling` — pure: whole clips -> clip-level predicted factors and
  embeddings (mean over consecutive windows).
* :mod:`deepcontent.embed.inference` — the Ray Data pieces: shard reader, model actor, writer.
* :mod:`deepcontent.embed.stage` — the ``embed`` stage: incremental, one Iceberg commit per run.
* :mod:`deepcontent.embed.neighbors` — pure top-k cosine neighbours and the ``neighbors`` stage.
"""
