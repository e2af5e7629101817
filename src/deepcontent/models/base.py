"""What every audio -> latent-factor regressor shares: the forward / embedding API.

A model maps a batch of inputs to an *embedding* (the penultimate activations, what the embed
stage stores) and the embedding to predicted latent factors through one linear layer::

    x --features--> embedding (batch, embedding_dim) --dropout--> linear --> (batch, n_factors)

Subclasses implement :meth:`EmbeddingRegressor.features` and call :meth:`_init_head` once;
``forward``, ``embed`` and ``head`` come from here, so every model in the registry answers the
same three calls.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EmbeddingRegressor", "check_positive_int", "as_model_input"]


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError naming ``name`` and the bad value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def as_model_input(x: torch.Tensor, *, like: torch.Tensor, name: str) -> torch.Tensor:
    """Cast a floating input to the parameters' dtype.

    Stored log-mels are float16 and CPU convolutions do not take half precision, so casting here
    saves every caller the same line; integer input is refused rather than silently rescaled.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got dtype={x.dtype}")
    return x if x.dtype == like.dtype else x.to(like.dtype)


class EmbeddingRegressor(nn.Module):
    """Base class: ``features(x) -> (batch, embedding_dim)`` plus a linear output layer.

    Attributes
    ----------
    n_factors : int
        Size of the prediction (the number of latent factors).
    embedding_dim : int
        Size of the embedding returned by :meth:`embed`.
    """

    n_factors: int
    embedding_dim: int

    def _init_head(self, *, embedding_dim: int, n_factors: int, dropout: float) -> None:
        self.n_factors = check_positive_int("n_factors", n_factors)
        self.embedding_dim = check_positive_int("embedding_dim", embedding_dim)
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        # Identity rather than Dropout(0) keeps the module tree (and state_dict) free of no-ops.
        self.head_dropout: nn.Module = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.output = nn.Linear(self.embedding_dim, self.n_factors)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Input batch -> embedding ``(batch, embedding_dim)``."""
        raise NotImplementedError

    def head(self, embedding: torch.Tensor) -> torch.Tensor:
        """Embedding ``(batch, embedding_dim)`` -> predicted factors ``(batch, n_factors)``."""
        return self.output(self.head_dropout(embedding))

    def forward(self, x: torch.Tensor, *, return_embedding: bool = False):
        """Predict latent factors.

        Returns
        -------
        pred : torch.Tensor [shape=(batch, n_factors)]
            Or ``(pred, embedding)`` with ``embedding`` of shape ``(batch, embedding_dim)`` when
            ``return_embedding`` is true (one pass for both, as the embed stage needs).
        """
        emb = self.features(x)
        pred = self.head(emb)
        return (pred, emb) if return_embedding else pred

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate activations ``(batch, embedding_dim)``; no output layer is run."""
        return self.features(x)
