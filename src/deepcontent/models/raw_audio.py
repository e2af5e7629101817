"""End-to-end learning from raw audio (thesis ch. 5): a strided convolution replaces the spectrogram.

::

    (batch, n_samples) mono audio at 22,050 Hz
      conv1d n_filters x filter_length samples, stride = filter_length  -> (batch, n_filters, n_frames)
      compression nonlinearity                                           (a learned "log-mel")
      PaperCNN or DeepCNN back end, unchanged, with n_mels = n_filters   -> (batch, n_factors)

With ``filter_length = stride = 512`` at 22,050 Hz the front end emits ≈43 frames/s, the frame
rate of the stored spectrograms, so the back end sees the same time scale either way; the
default ``n_samples = 130 · 512 = 66,560`` (≈3 s) gives the paper's 130 frames.

The front end's nonlinearity is a choice the thesis measured (Table 5.2, MagnaTagATune AUC with
a 1024-sample front end): ReLU 0.837, ``log(1 + C·x²)`` 0.751, ``log(1 + C·x)`` 0.749. So the
log compressions that make spectrograms work *hurt* when the filters are learned. All three are
offered (``nonlinearity=``); the default follows the measurement: ``"relu"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepcontent.models.base import EmbeddingRegressor, as_model_input, check_positive_int
from deepcontent.models.deep_cnn import DeepCNN
from deepcontent.models.paper_cnn import PaperCNN

__all__ = ["NONLINEARITIES", "RawAudioCNN", "StridedFrontEnd"]

#: Front-end nonlinearities: ``"relu"`` max(0, x); ``"log1p"`` log(1 + C·max(0, x)) (a learned
#: filterbank followed by the spectrogram's compression); ``"log1p_square"`` log(1 + C·x²) (the
#: filter output squared like a power spectrum, then compressed).
NONLINEARITIES: tuple[str, ...] = ("relu", "log1p", "log1p_square")

_BACKENDS = {"paper_cnn": PaperCNN, "deep_cnn": DeepCNN}


class StridedFrontEnd(nn.Module):
    """A strided Conv1d over raw audio and a compression: ``(batch, n_samples)`` ->
    ``(batch, n_filters, n_frames)`` with ``n_frames = 1 + (n_samples - filter_length) // stride``.

    Parameters
    ----------
    n_filters : int
        Output channels (the learned "bands"). Default 128.
    filter_length : int
        Samples per filter, 256..1024 in the thesis. Default 512.
    stride : int or None
        Hop in samples; ``None`` means ``filter_length`` (non-overlapping, as in the thesis).
    nonlinearity : str
        One of :data:`NONLINEARITIES`. Default ``"relu"``: the thesis (Table 5.2) found it
        beats a log compression after a learned front end (AUC 0.837 vs 0.749).
    compression : float > 0
        ``C`` of the log nonlinearities. Default 10,000, the spectrogram's.
    """

    def __init__(
        self,
        *,
        n_filters: int = 128,
        filter_length: int = 512,
        stride: int | None = None,
        nonlinearity: str = "relu",
        compression: float = 10_000.0,
    ) -> None:
        super().__init__()
        self.n_filters = check_positive_int("n_filters", n_filters)
        self.filter_length = check_positive_int("filter_length", filter_length, minimum=2)
        self.stride = self.filter_length if stride is None else check_positive_int("stride", stride)
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity={nonlinearity!r}; expected one of {NONLINEARITIES}")
        if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not compression > 0:
            raise ValueError(f"compression must be a number > 0, got {compression!r}")
        self.nonlinearity = nonlinearity
        self.compression = float(compression)
        self.conv = nn.Conv1d(1, self.n_filters, self.filter_length, stride=self.stride)

    def n_frames(self, n_samples: int) -> int:
        """Frames produced from ``n_samples`` samples (0 if fewer than ``filter_length``)."""
        return 0 if n_samples < self.filter_length else 1 + (n_samples - self.filter_length) // self.stride

    def min_samples(self, n_frames: int) -> int:
        """Fewest samples that yield ``n_frames`` frames."""
        return self.filter_length + (max(n_frames, 1) - 1) * self.stride

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``(batch, n_samples)`` or ``(batch, 1, n_samples)`` -> ``(batch, n_filters, n_frames)``."""
        audio = as_model_input(audio, like=self.conv.weight, name="audio")
        if audio.dim() == 2:
            audio = audio.unsqueeze(1)
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(f"audio must have shape (batch, n_samples) or (batch, 1, n_samples), got {tuple(audio.shape)}")
        if audio.shape[2] < self.filter_length:
            raise ValueError(f"audio has {audio.shape[2]} samples, fewer than filter_length={self.filter_length}")
        h = self.conv(audio)
        if self.nonlinearity == "relu":
            return torch.relu(h)
        if self.nonlinearity == "log1p":
            return torch.log1p(self.compression * torch.relu(h))
        return torch.log1p(self.compression * h.square())


class RawAudioCNN(EmbeddingRegressor):
    """:class:`StridedFrontEnd` followed by a :class:`PaperCNN` or :class:`DeepCNN` back end.

    Parameters
    ----------
    n_factors : int
        Output size.
    backend : str
        ``"paper_cnn"`` (default) or ``"deep_cnn"``.
    n_samples : int
        Samples per input window, only for ``backend="paper_cnn"`` (whose dense layer fixes the
        length). Default 66,560 = 130 frames of 512 samples (≈3.02 s at 22,050 Hz).
    n_filters, filter_length, stride, nonlinearity, compression
        Of the front end, see :class:`StridedFrontEnd`.
    backend_params : dict, optional
        Further keyword arguments of the back end (``hidden``, ``channels``, ``dropout``, ...);
        ``n_mels`` and ``n_frames`` are set from the front end and may not appear.

    Attributes
    ----------
    frontend : StridedFrontEnd
    backend : PaperCNN or DeepCNN
    min_samples : int
        Shortest accepted input.

    Examples
    --------
    >>> model = RawAudioCNN(n_factors=50)
    >>> model(torch.zeros(2, 66_560)).shape
    torch.Size([2, 50])
    """

    def __init__(
        self,
        *,
        n_factors: int,
        backend: str = "paper_cnn",
        n_samples: int = 130 * 512,
        n_filters: int = 128,
        filter_length: int = 512,
        stride: int | None = None,
        nonlinearity: str = "relu",
        compression: float = 10_000.0,
        backend_params: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend={backend!r}; expected one of {sorted(_BACKENDS)}")
        params = dict(backend_params or {})
        clash = sorted({"n_mels", "n_frames", "n_factors"} & params.keys())
        if clash:
            raise ValueError(f"backend_params may not set {clash}: they follow from the front end and n_factors")
        self.frontend = StridedFrontEnd(
            n_filters=n_filters, filter_length=filter_length, stride=stride, nonlinearity=nonlinearity,
            compression=compression,
        )
        self.backend_name = backend
        if backend == "paper_cnn":
            self.n_samples: int | None = check_positive_int("n_samples", n_samples)
            n_frames = self.frontend.n_frames(self.n_samples)
            if n_frames < 1:
                raise ValueError(f"n_samples={n_samples} is shorter than filter_length={filter_length}")
            try:  # PaperCNN refuses a frame count too short for its pools and names the minimum
                self.backend = PaperCNN(n_factors=n_factors, n_mels=self.frontend.n_filters, n_frames=n_frames, **params)
            except ValueError as exc:
                raise ValueError(f"n_samples={n_samples} gives {n_frames} front-end frames: {exc}") from None
            self.min_samples = self.frontend.min_samples(self.backend.min_frames)
        else:
            self.n_samples = None
            self.backend = DeepCNN(n_factors=n_factors, n_mels=self.frontend.n_filters, **params)
            self.min_samples = self.frontend.min_samples(self.backend.min_frames)
        # The head lives in the back end; mirror its sizes so callers can treat every model alike.
        self.n_factors = self.backend.n_factors
        self.embedding_dim = self.backend.embedding_dim

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio ``(batch, n_samples)`` -> embedding ``(batch, embedding_dim)``.

        Raises
        ------
        ValueError
            For a wrong shape, or fewer samples than the back end needs (paper back end: a
            length other than ``n_samples``); the message names the sample count.
        """
        n = audio.shape[-1] if isinstance(audio, torch.Tensor) else None
        if self.n_samples is not None and n is not None and n != self.n_samples:
            raise ValueError(
                f"RawAudioCNN (paper_cnn back end) was built for n_samples={self.n_samples} but the input has "
                f"{n} samples"
            )
        if n is not None and n < self.min_samples:
            raise ValueError(f"input has {n} samples but RawAudioCNN needs at least min_samples={self.min_samples}")
        return self.backend.features(self.frontend(audio))

    def head(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.backend.head(embedding)
