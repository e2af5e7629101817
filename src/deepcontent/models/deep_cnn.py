"""A deeper, modern variant of the paper's CNN, for any window length.

"At Spotify, a larger net with data augmentation and dropout did better" (PAPERS.md): this is
that kind of net. Convolutions still run over time only (bands are channels), but there are
more blocks, batch normalisation, and *global* temporal pooling, so the window length is free
and the same weights score a 3 s window or a whole 30 s clip::

    (batch, n_mels, n_frames)
      [conv1d k, 'same' padding -> BatchNorm -> ReLU -> max-pool p_i]  x len(channels)
      global pooling over time: mean ‖ max                   -> (batch, 2·channels[-1])
      dropout -> dense embedding_dim, ReLU  (the embedding)  -> (batch, embedding_dim)
      dropout -> linear n_factors                            -> (batch, n_factors)

With 'same' padding each block only divides the length by its pool width, so the shortest
usable input is ``prod(pool_sizes)`` frames (32 at the defaults, ≈0.74 s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from deepcontent.models.base import EmbeddingRegressor, as_model_input, check_positive_int

__all__ = ["DeepCNN"]


class DeepCNN(EmbeddingRegressor):
    """Conv blocks with batch norm, global mean ‖ max pooling, dropout and a dense embedding.

    Parameters
    ----------
    n_factors : int
        Output size.
    n_mels : int
        Input channels (mel bands). Default 128.
    channels : sequence of int
        Filters per conv block. Default ``(256, 256, 256, 512)``.
    kernel_size : int
        Frames per filter in every block. Default 3.
    pool_sizes : sequence of int
        Max-pool width after each block, same length as ``channels``. Default ``(4, 2, 2, 2)``.
    embedding_dim : int
        Units of the dense embedding layer. Default 512.
    dropout : float in [0, 1)
        Dropout before the embedding layer and before the output layer. Default 0.5.

    Attributes
    ----------
    min_frames : int
        ``prod(pool_sizes)``: shorter inputs raise.

    Examples
    --------
    >>> model = DeepCNN(n_factors=50).eval()
    >>> model(torch.zeros(2, 128, 130)).shape, model.embed(torch.zeros(2, 128, 1292)).shape
    (torch.Size([2, 50]), torch.Size([2, 512]))
    """

    def __init__(
        self,
        *,
        n_factors: int,
        n_mels: int = 128,
        channels: Sequence[int] = (256, 256, 256, 512),
        kernel_size: int = 3,
        pool_sizes: Sequence[int] = (4, 2, 2, 2),
        embedding_dim: int = 512,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.n_mels = check_positive_int("n_mels", n_mels)
        channels = tuple(channels)
        pool_sizes = tuple(pool_sizes)
        if not channels or len(channels) != len(pool_sizes):
            raise ValueError(
                f"channels and pool_sizes must be non-empty and of equal length, got channels={channels!r} "
                f"and pool_sizes={pool_sizes!r}"
            )
        kernel_size = check_positive_int("kernel_size", kernel_size)
        blocks = []
        c_in = self.n_mels
        for i, (c, p) in enumerate(zip(channels, pool_sizes)):
            c = check_positive_int(f"channels[{i}]", c)
            p = check_positive_int(f"pool_sizes[{i}]", p)
            blocks.append(
                nn.Sequential(
                    # No conv bias: the BatchNorm shift right after it would cancel it.
                    nn.Conv1d(c_in, c, kernel_size, padding="same", bias=False),
                    nn.BatchNorm1d(c),
                    nn.ReLU(),
                    nn.MaxPool1d(p) if p > 1 else nn.Identity(),
                )
            )
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.pool_sizes = pool_sizes
        self.min_frames = math.prod(pool_sizes)
        self.pool_dropout: nn.Module = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        self.dense = nn.Linear(2 * c_in, check_positive_int("embedding_dim", embedding_dim))
        self.relu = nn.ReLU()
        self._init_head(embedding_dim=embedding_dim, n_factors=n_factors, dropout=dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Log-mels ``(batch, n_mels, n_frames)`` with ``n_frames >= min_frames`` -> embedding
        ``(batch, embedding_dim)``.

        Raises
        ------
        ValueError
            If ``x`` is not 3-D with ``n_mels`` bands, or has fewer than ``min_frames`` frames
            (the message gives both counts).
        """
        x = as_model_input(x, like=self.dense.weight, name="x")
        if x.dim() != 3 or x.shape[1] != self.n_mels:
            raise ValueError(f"x must have shape (batch, n_mels={self.n_mels}, n_frames), got {tuple(x.shape)}")
        if x.shape[2] < self.min_frames:
            raise ValueError(
                f"input has {x.shape[2]} frames but DeepCNN needs at least min_frames={self.min_frames} "
                f"(the product of pool_sizes={self.pool_sizes})"
            )
        h = self.blocks(x)
        # Mean and max over time: the mean says how much of a feature there is, the max whether
        # it occurs at all (Dieleman's Spotify net pooled mean, max and L2 norm over time).
        pooled = torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1)
        return self.relu(self.dense(self.pool_dropout(pooled)))
