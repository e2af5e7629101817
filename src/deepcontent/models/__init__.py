"""Audio -> latent-factor regressors (the paper's CNN, a deeper CNN, a raw-audio front end),
their windowing / augmentation helpers, and the fixed-feature baselines.

Build a network by name with :func:`build_model`; every network answers
``model(x) -> (batch, n_factors)``, ``model(x, return_embedding=True) -> (pred, embedding)``
and ``model.embed(x) -> (batch, embedding_dim)``.
"""

from deepcontent.models.augment import apply_gain, consecutive_windows, random_gain, random_windows
from deepcontent.models.base import EmbeddingRegressor
from deepcontent.models.deep_cnn import DeepCNN
from deepcontent.models.paper_cnn import PaperCNN
from deepcontent.models.raw_audio import RawAudioCNN, StridedFrontEnd
from deepcontent.models.factory import MODELS, build_model

__all__ = [
    "MODELS",
    "DeepCNN",
    "EmbeddingRegressor",
    "PaperCNN",
    "RawAudioCNN",
    "StridedFrontEnd",
    "apply_gain",
    "build_model",
    "consecutive_windows",
    "random_gain",
    "random_windows",
]
