"""Build a regressor by name, so configs and checkpoints can say which net they hold.

>>> model = build_model("paper_cnn", n_factors=50)
>>> model = build_model("deep_cnn", n_factors=400, dropout=0.3)
>>> model = build_model("raw_audio", n_factors=50, filter_length=1024, backend="deep_cnn")
"""

from __future__ import annotations

import inspect
from typing import Any

from deepcontent.models.base import EmbeddingRegressor
from deepcontent.models.deep_cnn import DeepCNN
from deepcontent.models.paper_cnn import PaperCNN
from deepcontent.models.raw_audio import RawAudioCNN

__all__ = ["MODELS", "build_model"]

#: Registered model names and their classes.
MODELS: dict[str, type[EmbeddingRegressor]] = {
    "paper_cnn": PaperCNN,
    "deep_cnn": DeepCNN,
    "raw_audio": RawAudioCNN,
}


def build_model(name: str, *, n_factors: int, **params: Any) -> EmbeddingRegressor:
    """Instantiate the model registered as ``name``.

    Parameters
    ----------
    name : str
        One of :data:`MODELS` (``"paper_cnn"``, ``"deep_cnn"``, ``"raw_audio"``).
    n_factors : int
        Output size.
    **params
        The model's own keyword arguments (see each class).

    Returns
    -------
    model : EmbeddingRegressor
        With ``forward(x, *, return_embedding=False)``, ``embed(x)``, ``n_factors`` and
        ``embedding_dim``.

    Raises
    ------
    ValueError
        For an unknown ``name`` (the message lists the choices) or a parameter the model does
        not take (the message lists the ones it does).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model name={name!r}; expected one of {sorted(MODELS)}")
    cls = MODELS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "n_factors")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} does not take {unknown}; it takes {accepted}")
    return cls(n_factors=n_factors, **params)
