"""Hand-crafted descriptors of a clip, computed from its stored log-mel spectrogram.

Used to interpret embedding dimensions (thesis §4.6: which learned dimension tracks loudness,
tempo, brightness…): :func:`~deepcontent.evaluate.transfer.descriptor_correlations` reports the
dimension most correlated with each. Working from the stored spectrogram (not the audio) keeps
the evaluation free of a second decode; every descriptor is defined on the mel power, which
is recovered exactly from the stored ``log(1 + C·x)`` compression.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DESCRIPTORS", "mel_descriptors"]

DESCRIPTORS = ("loudness_db", "onset_rate", "spectral_centroid_hz", "tempo_bpm", "harmonic_percussive_ratio_db")


def mel_descriptors(log_mel: np.ndarray, *, sample_rate: int, hop_length: int, compression: float,
                    fmax: float | None = None) -> dict[str, float]:
    """Five descriptors of one clip.

    Parameters
    ----------
    log_mel : np.ndarray [shape=(n_mels, n_frames)]
        ``log(1 + compression · mel_power)`` as the spectrograms stage stores it (any float dtype).
    sample_rate, hop_length : int
        Of the spectrogram (frames per second = sample_rate / hop_length).
    compression : float > 0
        The ``C`` of the stored compression.
    fmax : float, optional
        Top of the mel scale; default sample_rate / 2.

    Returns
    -------
    dict
        ``loudness_db`` (mean mel power in dB), ``onset_rate`` (onsets per second from the mel
        spectral flux), ``spectral_centroid_hz`` (power-weighted mean band frequency),
        ``tempo_bpm`` (from the onset envelope's autocorrelation) and
        ``harmonic_percussive_ratio_db`` (median-filter HPSS energy ratio). NaN where undefined
        (e.g. silence).

    Raises
    ------
    ValueError
        If ``log_mel`` is not 2-D or ``compression`` is not positive.
    """
    import librosa

    L = np.asarray(log_mel, dtype=np.float64)
    if L.ndim != 2:
        raise ValueError(f"log_mel must be 2-D (n_mels, n_frames), got shape {L.shape}")
    if not compression > 0:
        raise ValueError(f"compression must be > 0, got {compression!r}")
    power = np.expm1(np.maximum(L, 0.0)) / compression  # the mel power, exactly
    n_mels, n_frames = power.shape
    fps = sample_rate / hop_length
    total = power.sum()
    out = dict.fromkeys(DESCRIPTORS, float("nan"))
    if not total > 0 or n_frames < 4:
        return out
    out["loudness_db"] = float(10 * np.log10(power.mean()))
    freqs = librosa.mel_frequencies(n_mels=n_mels, fmin=0.0, fmax=fmax or sample_rate / 2)
    out["spectral_centroid_hz"] = float((power.sum(axis=1) @ freqs) / total)
    db = librosa.power_to_db(power, ref=np.max)
    env = librosa.onset.onset_strength(S=db, sr=sample_rate, hop_length=hop_length)
    onsets = librosa.onset.onset_detect(onset_envelope=env, sr=sample_rate, hop_length=hop_length)
    out["onset_rate"] = float(len(onsets) / (n_frames / fps))
    tempo = librosa.feature.tempo(onset_envelope=env, sr=sample_rate, hop_length=hop_length)
    out["tempo_bpm"] = float(np.asarray(tempo).ravel()[0])
    harm, perc = librosa.decompose.hpss(power)
    h, p = harm.sum(), perc.sum()
    if h > 0 and p > 0:
        out["harmonic_percussive_ratio_db"] = float(10 * np.log10(h / p))
    return out
