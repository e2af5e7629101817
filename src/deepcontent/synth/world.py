"""The generative model of the synthetic catalog ("world").

Songs
    Each song has an artist, a genre (its artist's), a hidden *community* (its artist's: a
    scene, label or era that shapes who listens but leaves no trace in the audio), audible
    attributes drawn around its genre's priors (:mod:`deepcontent.synth.attributes`), and a
    popularity = artist popularity × song popularity (both log-normal, so plays follow a power
    law over songs).

Users
    Each user has a taste over genres (Dirichlet, peaky), a taste over communities (Dirichlet),
    a linear preference over the continuous audible attributes (tempo, brightness, density,
    percussion, distortion, minor-ness, swing) and an activity level (log-normal number of
    distinct songs, mean ``mean_plays_per_user``).

Plays
    For every user we draw candidate songs: a niche (genre, community) from the user's two
    tastes, then a song inside the niche in proportion to popularity; a candidate is kept with
    probability sigmoid(preference · attributes). The first ``n_u`` kept candidates are the
    user's songs; repeated draws of a song raise its count, and a Zipf-distributed extra gives
    counts their heavy tail (as in the Taste Profile, most counts are 1 or 2).

    So the latent factors that WMF recovers from plays mix what the audio reveals (genre,
    attributes) with what it cannot (community, popularity): a content model can predict them
    only in part, which is the regime the papers report (CNN well above a bag-of-words
    baseline, both well below the WMF upper bound).

Tags
    Last.fm-style tags with weights 0–100 derive noisily from the attributes (genre names,
    moods, instruments, tempo words) plus community tags the audio cannot reveal, plus noise.

Everything is vectorised over songs and users and processed in user blocks, so the
plays-only mode reaches Taste Profile size (1,019,318 users × 384,546 songs × ~48M plays) on
one machine. The world is a pure function of the seed and sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from deepcontent.synth.attributes import GENRES, N_TIMBRES, SongAttributes, attribute_vector, sample_attributes

_ID_CHARS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype=np.uint8)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_SYLLABLES = (
    "ka lo mi ra ve nu so ta be ri do ly fa ge no pe zu la mo ti sa re ka vi "
    "dan mar tel ros ven kor lin bar sel tor mun gal hal pin dor fen").split()
_COMMUNITY_TAGS = ("underground", "80s", "90s", "indie", "classic", "college radio", "festival", "lo-fi")


def msd_ids(prefix: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unique MSD-style ids: ``prefix`` + 16 chars of [A-Z0-9] (e.g. ``TRMMMYQ128F932D901``).

    Returns an array of Python ``str`` (object dtype), shape ``(n,)``."""
    out = np.empty(0, dtype=object)
    while len(out) < n:
        need = n - len(out)
        codes = _ID_CHARS[rng.integers(0, len(_ID_CHARS), size=(need, 16))]
        raw = codes.view("S16").ravel()
        fresh = np.char.add(prefix.encode(), raw).astype(str).astype(object)
        out = np.unique(np.concatenate([out, fresh])) if len(out) else np.unique(fresh)
    return rng.permutation(out[:n])


def user_hashes(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` unique 40-hex-char user ids like the Taste Profile's SHA-1 hashes, shape ``(n,)``."""
    nibbles = rng.integers(0, 16, size=(n, 40))
    raw = _HEX[nibbles].view("S40").ravel().astype(str).astype(object)
    if len(np.unique(raw)) != n:  # 160 random bits: never in practice, but never silently
        raise RuntimeError("user id collision; change the seed")
    return raw


def _names(n: int, rng: np.random.Generator, *, words: tuple[int, int]) -> list[str]:
    syl = np.array(_SYLLABLES, dtype=object)
    out = []
    n_words = rng.integers(words[0], words[1] + 1, size=n)
    n_syl = rng.integers(1, 4, size=(n, words[1]))
    picks = rng.integers(0, len(syl), size=(n, words[1], 3))
    for i in range(n):
        ws = ["".join(syl[picks[i, w, : n_syl[i, w]]]).capitalize() for w in range(n_words[i])]
        out.append(" ".join(ws))
    return out


@dataclass
class Songs:
    """Song-level arrays, all of length ``n_songs``."""

    song_id: np.ndarray  # (S,) str
    track_id: np.ndarray  # (S,) str
    artist_idx: np.ndarray  # (S,) int32
    artist_name: np.ndarray  # (S,) str
    title: np.ndarray  # (S,) str
    genre_idx: np.ndarray  # (S,) int16, index into GENRES
    community: np.ndarray  # (S,) int16, hidden
    popularity: np.ndarray  # (S,) float64, > 0
    features: np.ndarray  # (S, len(GENRES) + 7) float32, attribute_vector of each song
    attributes: list[SongAttributes] | None  # per song (None when not needed)

    @property
    def n(self) -> int:
        return len(self.song_id)


@dataclass
class Users:
    user_id: np.ndarray  # (U,) str
    genre_taste: np.ndarray  # (U, G) float32, rows sum to 1
    community_taste: np.ndarray  # (U, C) float32, rows sum to 1
    preference: np.ndarray  # (U, 7) float32 over the continuous attributes
    n_songs: np.ndarray  # (U,) int32, distinct songs to draw

    @property
    def n(self) -> int:
        return len(self.user_id)


def n_communities(n_songs: int) -> int:
    """Hidden communities: enough niches to matter, few enough that niches are not empty."""
    return int(np.clip(n_songs // 60, 2, 8))


def song_seed(seed: int, index: int) -> np.random.SeedSequence:
    """Per-song seed: a song's attributes and audio do not depend on generation order."""
    return np.random.SeedSequence([seed, 0x50, index])


def make_songs(n_songs: int, *, seed: int, with_attributes: bool = True, songs_per_artist: int = 8) -> Songs:
    """Draw the catalog's songs (see module docstring). Cost ~20 µs per song."""
    if n_songs < len(GENRES):
        raise ValueError(f"n_songs must be at least {len(GENRES)} (one per genre), got {n_songs}")
    rng = np.random.default_rng([seed, 1])
    n_artists = max(len(GENRES), n_songs // songs_per_artist)
    n_comm = n_communities(n_songs)
    artist_genre = np.arange(n_artists) % len(GENRES)  # every genre has artists
    rng.shuffle(artist_genre)
    artist_comm = rng.integers(0, n_comm, size=n_artists)
    artist_pop = rng.lognormal(0.0, 1.0, size=n_artists)
    artist_names = np.array(_names(n_artists, rng, words=(1, 3)), dtype=object)
    # Every artist gets at least one song, the rest by a skewed draw (prolific artists exist).
    extra = rng.choice(n_artists, size=n_songs - n_artists, p=artist_pop / artist_pop.sum()) if n_songs > n_artists else np.empty(0, int)
    artist_idx = np.concatenate([np.arange(min(n_artists, n_songs)), extra]).astype(np.int32)
    rng.shuffle(artist_idx)
    genre_idx = artist_genre[artist_idx].astype(np.int16)
    popularity = artist_pop[artist_idx] * rng.lognormal(0.0, 1.0, size=n_songs)

    attrs: list[SongAttributes] = []
    features = np.empty((n_songs, len(GENRES) + 7), dtype=np.float32)
    for i in range(n_songs):
        a = sample_attributes(GENRES[genre_idx[i]], np.random.default_rng(song_seed(seed, i)))
        features[i] = attribute_vector(a)
        if with_attributes:
            attrs.append(a)
    return Songs(
        song_id=msd_ids("SO", n_songs, rng),
        track_id=msd_ids("TR", n_songs, rng),
        artist_idx=artist_idx,
        artist_name=artist_names[artist_idx],
        title=np.array(_names(n_songs, rng, words=(1, 4)), dtype=object),
        genre_idx=genre_idx,
        community=artist_comm[artist_idx].astype(np.int16),
        popularity=popularity,
        features=features,
        attributes=attrs if with_attributes else None,
    )


def make_users(n_users: int, *, n_comm: int, mean_songs: float, seed: int) -> Users:
    rng = np.random.default_rng([seed, 2])
    genre_taste = rng.dirichlet(np.full(len(GENRES), 0.3), size=n_users).astype(np.float32)
    community_taste = rng.dirichlet(np.full(n_comm, 0.5), size=n_users).astype(np.float32)
    preference = rng.normal(0.0, 1.5, size=(n_users, 7)).astype(np.float32)
    # Log-normal activity with the requested mean; at least one song each.
    sigma = 0.9
    n_songs = rng.lognormal(np.log(max(mean_songs, 1.0)) - sigma**2 / 2, sigma, size=n_users)
    n_songs = np.maximum(1, np.round(n_songs)).astype(np.int32)
    return Users(user_hashes(n_users, rng), genre_taste, community_taste, preference, n_songs)


class _NicheIndex:
    """Songs grouped by niche = genre × community, with cumulative popularity inside each
    niche so that "a song of niche n in proportion to popularity" is one ``searchsorted``."""

    def __init__(self, songs: Songs, n_comm: int) -> None:
        self.n_comm = n_comm
        niche = songs.genre_idx.astype(np.int64) * n_comm + songs.community
        self.n_niches = len(GENRES) * n_comm
        order = np.lexsort((np.arange(songs.n), niche))
        self.song_of = order  # songs sorted by niche
        sorted_niche = niche[order]
        pop = songs.popularity[order]
        counts = np.bincount(sorted_niche, minlength=self.n_niches)
        self.nonempty = counts > 0
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        cum0 = np.concatenate([[0.0], np.cumsum(pop)])  # cum0[k] = mass of the first k songs
        before = cum0[starts]  # mass before each niche's first song
        total = cum0[starts + counts] - before
        # key in [niche, niche + 1]: cumulative share of its niche's popularity mass
        self.keys = sorted_niche + (cum0[1:] - before[sorted_niche]) / total[sorted_niche]
        self.starts, self.counts = starts, counts

    def draw(self, niche: np.ndarray, u: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.keys, niche + u, side="left")
        lo = self.starts[niche]
        idx = np.clip(idx, lo, lo + self.counts[niche] - 1)
        return self.song_of[idx]


def _sample_rows(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Categorical draw per row: ``cum`` (n, k) row-wise cumulative probabilities."""
    return np.minimum((cum < u[:, None]).sum(axis=1), cum.shape[1] - 1)


def iter_plays(
    songs: Songs,
    users: Users,
    *,
    seed: int,
    block_users: int = 50_000,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(user_index, song_index, play_count)`` arrays block by block (int32, int32, int32).

    Memory is bounded by the block: ~2.5 × block plays of candidates at a time."""
    n_comm = users.community_taste.shape[1]
    niches = _NicheIndex(songs, n_comm)
    cont = songs.features[:, len(GENRES):] - 0.5  # centred continuous attributes, (S, 7)
    for b0 in range(0, users.n, block_users):
        rng = np.random.default_rng([seed, 3, b0])
        ub = np.arange(b0, min(users.n, b0 + block_users))
        # P(niche) per user = genre taste × community taste, restricted to non-empty niches.
        p = (users.genre_taste[ub][:, :, None] * users.community_taste[ub][:, None, :]).reshape(len(ub), -1)
        p *= niches.nonempty[None, :]
        p /= p.sum(axis=1, keepdims=True)
        cum = np.cumsum(p, axis=1)
        n_cand = np.ceil(np.minimum(users.n_songs[ub], songs.n) * 3.0).astype(np.int64) + 4
        cand_user = np.repeat(np.arange(len(ub)), n_cand)
        cand_niche = np.empty(len(cand_user), dtype=np.int64)
        for c0 in range(0, len(cand_user), 1_000_000):
            sl = slice(c0, c0 + 1_000_000)
            cand_niche[sl] = _sample_rows(cum[cand_user[sl]], rng.random(len(cand_user[sl])))
        cand_song = niches.draw(cand_niche, rng.random(len(cand_user)))
        logit = np.einsum("ij,ij->i", cont[cand_song], users.preference[ub][cand_user]) * 3.0
        keep = rng.random(len(cand_user)) < 1.0 / (1.0 + np.exp(-logit))
        cand_user, cand_song = cand_user[keep], cand_song[keep]
        # A user's songs are the first n_u *distinct* kept candidates, in draw order; how
        # often a song was drawn among all kept candidates feeds its play count.
        key = (cand_user.astype(np.int64) + b0) * songs.n + cand_song
        uniq, first, mult = np.unique(key, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        uniq, mult = uniq[order], mult[order]
        local_user = (uniq // songs.n - b0).astype(np.int64)
        group_start = np.concatenate([[0], np.cumsum(np.bincount(local_user, minlength=len(ub)))[:-1]])
        # entries are grouped by user because candidates were generated user by user
        rank = np.arange(len(uniq)) - group_start[local_user]
        take = rank < users.n_songs[ub][local_user]
        uniq, mult = uniq[take], mult[take]
        counts = np.minimum(mult + rng.zipf(2.5, size=len(uniq)) - 1, 9_999).astype(np.int32)
        yield (uniq // songs.n).astype(np.int32), (uniq % songs.n).astype(np.int32), counts


def tags_for_song(attrs: SongAttributes, community: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """Last.fm-style ``[(tag, weight 0–100)]`` for one song, noisy, strongest first."""
    scores: dict[str, float] = {}

    def add(tag: str, strength: float) -> None:
        if strength > 0:
            scores[tag] = max(scores.get(tag, 0.0), strength)

    add(attrs.genre if attrs.genre != "hiphop" else "hip-hop", 1.0 if rng.random() < 0.85 else 0.0)
    tempo = (attrs.tempo_bpm - 60) / 130
    add("fast", tempo - 0.45)
    add("slow", 0.35 - tempo)
    add("energetic", (tempo + attrs.rhythm_density) / 2 - 0.55)
    add("mellow", 0.5 - (attrs.brightness + attrs.rhythm_density) / 2)
    add("heavy", attrs.distortion - 0.5)
    add("dance", (attrs.rhythm_density + (1 - abs(attrs.tempo_bpm - 122) / 60)) / 2 - 0.55)
    add("sad", 0.6 if attrs.mode == "minor" and attrs.brightness < 0.5 else 0.0)
    add("happy", 0.6 if attrs.mode == "major" and attrs.brightness > 0.55 else 0.0)
    add("instrumental", 0.5 - attrs.percussion)
    add("groovy", attrs.swing - 0.4)
    add("bright", attrs.brightness - 0.6)
    add(("piano", "organ", "guitar", "sax", "electric guitar", "synth", "electronic", "bass")[attrs.timbre % N_TIMBRES], 0.5)
    if rng.random() < 0.7:  # audio-invisible: the song's community
        add(_COMMUNITY_TAGS[community % len(_COMMUNITY_TAGS)], 0.6)
    if rng.random() < 0.15:  # pure noise, as real tags have
        add(("favorites", "seen live", "awesome", "love", "beautiful")[int(rng.integers(5))], 0.3)
    out = []
    for tag, s in scores.items():
        w = int(np.clip(round(100 * s + rng.normal(0, 10)), 0, 100))
        if w > 0 and rng.random() < 0.9:
            out.append((tag, w))
    out.sort(key=lambda t: (-t[1], t[0]))
    if out:  # Last.fm normalises so the top tag has weight 100
        top = out[0][1]
        out = [(t, int(round(100 * w / top))) for t, w in out]
    return out
