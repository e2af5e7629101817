"""Synthetic log-mels for the model tests: short clips of three contrasting genres, rendered
by the catalog synthesiser and put through the real spectrogram front end (WAV, to stay fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepcontent.audio.features import MelSettings, compute_log_mel
from deepcontent.synth.attributes import sample_attributes
from deepcontent.synth.audio import encode_audio, render_clip

#: Three genres far apart in tempo, percussion, distortion and timbre.
CONTRASTING = ("classical", "metal", "hiphop")
SR = 22050


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    """Every model test runs with one torch thread (see tests/conftest.py)."""


def render_log_mels(n_clips: int, *, seconds: float, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``n_clips`` float16 log-mels ``(128, n_frames)``, genres cycling through CONTRASTING."""
    rng = np.random.default_rng(seed)
    settings = MelSettings()
    mels, labels = [], []
    for i in range(n_clips):
        g = i % len(CONTRASTING)
        attrs = sample_attributes(CONTRASTING[g], rng)
        audio = render_clip(attrs, seconds=seconds, sample_rate=SR, seed=seed * 10_000 + i)
        mels.append(compute_log_mel(encode_audio(audio, sample_rate=SR, fmt="wav"), settings=settings)["mel"])
        labels.append(g)
    return mels, np.asarray(labels)


@pytest.fixture(scope="session")
def genre_clips() -> tuple[list[np.ndarray], np.ndarray]:
    """60 clips of 6 s (259 frames each) and their genre labels 0..2 (i % 3)."""
    return render_log_mels(60, seconds=6.0, seed=7)
