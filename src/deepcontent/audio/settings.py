"""Log-mel settings: what the spectrogram front end computes, and the key that names it.

Kept apart from :mod:`deepcontent.audio.features` (the DSP itself) so that configuration can
build a :class:`MelSettings` without importing the decoders: ``spectrograms`` in the config is
turned into one by :meth:`deepcontent.config.SpectrogramConfig.mel_settings`, the only place the
two meet.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["FEATURES_VERSION", "HPSS_KERNEL", "MEL_FIELDS", "RESAMPLE_QUALITY", "MelSettings"]

#: Bumped whenever the computation changes in a way that changes the output for given settings;
#: part of :meth:`MelSettings.key`, so stored spectrograms from older code count as stale.
FEATURES_VERSION = 1

#: soxr quality preset. "HQ" is the filter behind ``librosa.load``'s default ``res_type="soxr_hq"``
#: (so the pipeline matches the librosa reference to rounding); it costs about 1 ms per 30 s clip
#: more than "MQ" here, and "VHQ" buys nothing a 128-band log-mel can see.
RESAMPLE_QUALITY = "HQ"

#: Median-filter length (frames for the harmonic filter, bins for the percussive one) of HPSS,
#: librosa's default and the value of Fitzgerald (2010).
HPSS_KERNEL = 31

def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


@dataclass(frozen=True)
class MelSettings:
    """Parameters of the log-mel front end.

    Attributes
    ----------
    sample_rate : int > 0
        Rate (Hz) the audio is resampled to before the STFT. Default 22,050.
    n_fft : int >= 2
        STFT window and FFT length in samples (Hann window). Default 1024 (≈ 46 ms).
    hop_length : int > 0
        Samples between frame starts. Default 512 (≈ 23 ms).
    n_mels : int > 0
        Number of mel bands (Slaney mel scale and area normalisation, librosa's defaults).
    fmin : float >= 0
        Lowest band edge in Hz.
    fmax : float or None
        Highest band edge in Hz; ``None`` means ``sample_rate / 2``.
    compression : float > 0
        ``C`` of the compression ``log(1 + C x)`` applied to mel power. Default 10,000.
    hpss : bool
        Also compute harmonic and percussive log-mels (median-filter HPSS).
    max_seconds : float > 0
        Longer audio is rejected with ``AudioError(reason="too_long")`` before it is decoded.
    min_decoded_fraction : float in [0, 1]
        A file from which less than this share of the duration its header declares decodes is
        rejected as ``truncated``. Default 0.5.

    Raises
    ------
    ValueError
        If a field is out of range; the message names the field and its value.
    """

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 512
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float | None = None
    compression: float = 10_000.0
    hpss: bool = False
    max_seconds: float = 600.0
    min_decoded_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name, low in (("sample_rate", 1), ("n_fft", 2), ("hop_length", 1), ("n_mels", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise ValueError(f"MelSettings.{name} must be an integer >= {low}, got {value!r}")
        if not _is_real(self.fmin) or not math.isfinite(self.fmin) or self.fmin < 0:
            raise ValueError(f"MelSettings.fmin must be a finite number >= 0, got {self.fmin!r}")
        nyquist = self.sample_rate / 2.0
        if self.fmax is not None and (
            not _is_real(self.fmax) or not math.isfinite(self.fmax) or not self.fmin < self.fmax <= nyquist
        ):
            raise ValueError(
                f"MelSettings.fmax must be None or in (fmin={self.fmin!r}, sample_rate/2={nyquist!r}], "
                f"got {self.fmax!r}"
            )
        if self.fmax is None and not self.fmin < nyquist:
            raise ValueError(f"MelSettings.fmin={self.fmin!r} must be below sample_rate/2={nyquist!r}")
        if not _is_real(self.compression) or not math.isfinite(self.compression) or self.compression <= 0:
            raise ValueError(f"MelSettings.compression must be a finite number > 0, got {self.compression!r}")
        if not isinstance(self.hpss, (bool, np.bool_)):
            raise ValueError(f"MelSettings.hpss must be a bool, got {self.hpss!r}")
        if not _is_real(self.max_seconds) or not math.isfinite(self.max_seconds) or self.max_seconds <= 0:
            raise ValueError(f"MelSettings.max_seconds must be a finite number > 0, got {self.max_seconds!r}")
        if not _is_real(self.min_decoded_fraction) or not 0.0 <= self.min_decoded_fraction <= 1.0:
            raise ValueError(f"MelSettings.min_decoded_fraction must be a number in [0, 1], got {self.min_decoded_fraction!r}")

    @property
    def f_max(self) -> float:
        """``fmax`` with ``None`` resolved to ``sample_rate / 2``."""
        return float(self.sample_rate) / 2.0 if self.fmax is None else float(self.fmax)

    @property
    def n_bins(self) -> int:
        """Frequency bins of the STFT, ``1 + n_fft // 2``."""
        return 1 + self.n_fft // 2

    def key(self) -> str:
        """A short, stable identifier of everything that determines the stored output.

        Two settings get the same key exactly when they produce the same arrays from the same
        audio: ``fmax=None`` and ``fmax=sample_rate/2`` share a key, and ``max_seconds`` is left
        out, as is ``min_decoded_fraction`` (they decide which clips are accepted, not what an accepted
        clip's spectrogram is).
        The algorithm version (:data:`FEATURES_VERSION`), the resampler and the HPSS kernel are
        in it, so a stored spectrogram whose key differs from the current one is stale.

        Returns
        -------
        key : str
            ``"mel-"`` followed by 16 hex digits (64 bits of a SHA-256 over a canonical JSON of
            the parameters), e.g. ``"mel-3f9c0a1b2c3d4e5f"``.
        """
        spec = {
            "version": FEATURES_VERSION,
            "sample_rate": int(self.sample_rate),
            "n_fft": int(self.n_fft),
            "hop_length": int(self.hop_length),
            "window": "hann",
            "center": "constant",
            "n_mels": int(self.n_mels),
            "fmin": float(self.fmin),
            "fmax": self.f_max,
            "mel": "slaney/slaney",
            "compression": float(self.compression),
            "resample": f"soxr-{RESAMPLE_QUALITY}",
            "hpss": bool(self.hpss),
            "hpss_kernel": HPSS_KERNEL if self.hpss else None,
            "dtype": "float16",
        }
        blob = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
        return "mel-" + hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


#: The settings fields, in declaration order (the config section mirrors them one for one).
MEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(MelSettings))
