"""The CNN regressor of van den Oord, Dieleman & Schrauwen (NIPS 2013; thesis §4.5.2).

Log-mel windows of ~3 s in, latent factors out::

    (batch, 128, 130)
      conv1d 128 filters x (128 bands x 6 frames), ReLU   -> (batch, 128, 125)
      max-pool 4                                           -> (batch, 128, 31)
      conv1d 128 filters x 6 frames, ReLU                  -> (batch, 128, 26)
      max-pool 5                                           -> (batch, 128, 5)
      flatten                                              -> (batch, 640)
      dense 400, ReLU       (the embedding)                -> (batch, 400)
      linear n_factors                                     -> (batch, n_factors)

The convolutions run over time only: the first layer's filters span every mel band, so the
128 bands are the input *channels* of a ``Conv1d``. Parameters at the defaults:
2 x (128·128·6 + 128) + (640·400 + 400) + (400·f + f) = 453,264 + 401·f
(473,314 for f = 50, 613,664 for f = 400).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deepcontent.models.base import EmbeddingRegressor, as_model_input, check_positive_int

__all__ = ["PaperCNN", "conv_pool_length"]


def conv_pool_length(n_frames: int, *, filter_length: int, pool_sizes: Sequence[int]) -> int:
    """Frames left after each ``valid`` convolution of ``filter_length`` and max-pool in turn.

    A pool of ``p`` keeps ``floor(t / p)`` steps (PyTorch's ``ceil_mode=False``); a result
    below 1 means the input is too short for the network.
    """
    t = int(n_frames)
    for p in pool_sizes:
        t = t - filter_length + 1
        if t < 1:
            return 0
        t //= p
    return t


class PaperCNN(EmbeddingRegressor):
    """Two 1-D convolution + max-pool layers, a 400-unit dense layer and a linear output.

    Parameters
    ----------
    n_factors : int
        Output size (50 or 400 latent factors in the papers).
    n_mels : int
        Mel bands of the input = input channels of the first convolution. Default 128.
    n_frames : int
        Frames per input window. Default 130 (≈3 s at 22,050 Hz, hop 512). Fixed, because the
        dense layer sees the flattened feature map; clip-level prediction averages over
        windows (:func:`deepcontent.models.augment.consecutive_windows`).
    n_filters : int
        Filters in each convolution. Default 128.
    filter_length : int
        Frames spanned by each filter. Default 6.
    pool_sizes : (int, int)
        Max-pool widths after the first and second convolutions. Default ``(4, 5)``.
    hidden : int
        Units of the dense layer, i.e. the embedding size. Default 400.
    dropout : float in [0, 1)
        Dropout on the embedding before the output layer. Default 0 (the paper found no gain).

    Raises
    ------
    ValueError
        If a size is not a positive integer, or ``n_frames`` is too short to leave one time
        step after the last pool (the message gives the minimum).

    Examples
    --------
    >>> model = PaperCNN(n_factors=50)
    >>> pred, emb = model(torch.zeros(8, 128, 130), return_embedding=True)
    >>> pred.shape, emb.shape
    (torch.Size([8, 50]), torch.Size([8, 400]))
    """

    def __init__(
        self,
        *,
        n_factors: int,
        n_mels: int = 128,
        n_frames: int = 130,
        n_filters: int = 128,
        filter_length: int = 6,
        pool_sizes: Sequence[int] = (4, 5),
        hidden: int = 400,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_mels = check_positive_int("n_mels", n_mels)
        self.n_frames = check_positive_int("n_frames", n_frames)
        n_filters = check_positive_int("n_filters", n_filters)
        self.filter_length = check_positive_int("filter_length", filter_length)
        pools = tuple(pool_sizes)
        if len(pools) != 2:
            raise ValueError(f"pool_sizes must hold two pool widths, got {pool_sizes!r}")
        self.pool_sizes = tuple(check_positive_int(f"pool_sizes[{i}]", p) for i, p in enumerate(pools))
        self.min_frames = self._min_frames()
        if self.n_frames < self.min_frames:
            raise ValueError(
                f"n_frames={self.n_frames} is too short for filter_length={self.filter_length} and "
                f"pool_sizes={self.pool_sizes}: need at least {self.min_frames} frames"
            )
        self.out_frames = conv_pool_length(self.n_frames, filter_length=self.filter_length, pool_sizes=self.pool_sizes)

        self.conv1 = nn.Conv1d(self.n_mels, n_filters, self.filter_length)
        self.pool1 = nn.MaxPool1d(self.pool_sizes[0])
        self.conv2 = nn.Conv1d(n_filters, n_filters, self.filter_length)
        self.pool2 = nn.MaxPool1d(self.pool_sizes[1])
        self.dense = nn.Linear(n_filters * self.out_frames, check_positive_int("hidden", hidden))
        self.relu = nn.ReLU()
        self._init_head(embedding_dim=hidden, n_factors=n_factors, dropout=dropout)

    def _min_frames(self) -> int:
        # Smallest window that survives both conv + pool stages with one step left; a short
        # search is clearer than inverting floor() by hand.
        t = 1
        while conv_pool_length(t, filter_length=self.filter_length, pool_sizes=self.pool_sizes) < 1:
            t += 1
        return t

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Log-mel windows ``(batch, n_mels, n_frames)`` -> embedding ``(batch, hidden)``.

        Raises
        ------
        ValueError
            If ``x`` is not 3-D with ``n_mels`` bands and exactly ``n_frames`` frames; the
            message names the frame count that was given.
        """
        x = as_model_input(x, like=self.conv1.weight, name="x")
        if x.dim() != 3 or x.shape[1] != self.n_mels:
            raise ValueError(f"x must have shape (batch, n_mels={self.n_mels}, n_frames), got {tuple(x.shape)}")
        t = x.shape[2]
        if t != self.n_frames:
            hint = "too short; pad it (random_windows pads)" if t < self.n_frames else "crop it"
            raise ValueError(
                f"PaperCNN was built for n_frames={self.n_frames} but the input has {t} frames ({hint}, "
                f"or use consecutive_windows for whole clips)"
            )
        h = self.pool1(self.relu(self.conv1(x)))
        h = self.pool2(self.relu(self.conv2(h)))
        return self.relu(self.dense(h.flatten(1)))
