"""Latent musical attributes of a generated song: what its audio is synthesised from.

These are the *audible* half of a song's latent description (the world model in
:mod:`deepcontent.synth.world` adds audio-invisible factors on top). Genre sets the priors;
each attribute then varies per song so that two songs of one genre still sound different.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# GTZAN's ten genres: the generated transfer set uses the same folder names.
GENRES: tuple[str, ...] = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
MODES: tuple[str, ...] = ("major", "minor")
N_TIMBRES = 8  # lead-instrument families the synthesiser knows


@dataclass(frozen=True)
class SongAttributes:
    """Audible latent attributes of one song.

    genre: one of :data:`GENRES`.
    tempo_bpm: beats per minute, 60–190.
    key: tonic as a semitone 0–11 (0 = C).
    mode: ``"major"`` or ``"minor"``.
    brightness: 0–1, spectral tilt of the harmonic parts (low = dark/muffled, high = bright).
    rhythm_density: 0–1, fraction of the 16th-note grid that carries percussion hits.
    percussion: 0–1, loudness of the drum kit relative to the harmonic parts (0 = no drums).
    distortion: 0–1, soft-clipping drive on the harmonic parts.
    timbre: lead-instrument family 0..N_TIMBRES-1 (harmonic recipe of the melody voice).
    swing: 0–1, delay of off-beat 8th notes (0 = straight, 1 = full triplet swing).
    """

    genre: str
    tempo_bpm: float
    key: int
    mode: str
    brightness: float
    rhythm_density: float
    percussion: float
    distortion: float
    timbre: int
    swing: float

    def to_dict(self) -> dict:
        return asdict(self)


# Per-genre priors: (tempo mean, tempo sd, brightness, density, percussion, distortion,
# P(minor), preferred timbres, swing). Values are centres; songs scatter around them.
_PRIORS: dict[str, tuple] = {
    "blues": (95, 12, 0.40, 0.35, 0.55, 0.15, 0.45, (2, 3), 0.6),
    "classical": (80, 15, 0.35, 0.05, 0.00, 0.00, 0.45, (0, 1), 0.0),
    "country": (110, 12, 0.55, 0.40, 0.55, 0.05, 0.20, (2, 4), 0.2),
    "disco": (122, 5, 0.70, 0.75, 0.85, 0.05, 0.40, (5, 6), 0.0),
    "hiphop": (92, 6, 0.45, 0.55, 0.95, 0.10, 0.60, (6, 7), 0.35),
    "jazz": (130, 25, 0.45, 0.30, 0.35, 0.00, 0.50, (1, 3), 0.7),
    "metal": (150, 20, 0.75, 0.85, 0.90, 0.90, 0.80, (4, 7), 0.0),
    "pop": (115, 10, 0.65, 0.55, 0.70, 0.10, 0.30, (5, 0), 0.05),
    "reggae": (75, 6, 0.50, 0.35, 0.65, 0.05, 0.40, (3, 6), 0.3),
    "rock": (125, 15, 0.60, 0.65, 0.80, 0.55, 0.45, (4, 2), 0.0),
}


def sample_attributes(genre: str, rng: np.random.Generator) -> SongAttributes:
    """Draw one song's attributes around the priors of ``genre``."""
    if genre not in _PRIORS:
        raise ValueError(f"unknown genre {genre!r}; expected one of {GENRES}")
    t_mu, t_sd, bright, dens, perc, dist, p_minor, timbres, swing = _PRIORS[genre]

    def around(centre: float, spread: float = 0.12) -> float:
        return float(np.clip(centre + rng.normal(0.0, spread), 0.0, 1.0))

    timbre = int(rng.choice(timbres)) if rng.random() < 0.8 else int(rng.integers(N_TIMBRES))
    return SongAttributes(
        genre=genre,
        tempo_bpm=float(np.clip(rng.normal(t_mu, t_sd), 60.0, 190.0)),
        key=int(rng.integers(12)),
        mode="minor" if rng.random() < p_minor else "major",
        brightness=around(bright),
        rhythm_density=around(dens),
        percussion=around(perc, 0.08) if perc > 0 else 0.0,
        distortion=around(dist, 0.08),
        timbre=timbre,
        swing=around(swing, 0.1),
    )


def attribute_vector(attrs: SongAttributes) -> np.ndarray:
    """Numeric encoding used by the taste model, shape ``(len(GENRES) + 7,)``, float32.

    One-hot genre, then tempo (scaled to ~[0, 1]), brightness, density, percussion,
    distortion, minor-ness and swing."""
    onehot = np.zeros(len(GENRES), dtype=np.float32)
    onehot[GENRES.index(attrs.genre)] = 1.0
    cont = np.array(
        [
            (attrs.tempo_bpm - 60.0) / 130.0,
            attrs.brightness,
            attrs.rhythm_density,
            attrs.percussion,
            attrs.distortion,
            1.0 if attrs.mode == "minor" else 0.0,
            attrs.swing,
        ],
        dtype=np.float32,
    )
    return np.concatenate([onehot, cont])
