"""Audio files in every codec a real catalog carries, built in the test: MP3 (LAME), Ogg Vorbis
and Opus, FLAC, WAV and AIFF (libsndfile), AAC and ALAC in M4A (ffmpeg through PyAV); mono
and stereo; 16 to 48 kHz. Plus the spoiled ones: corrupt bytes, a truncated file, a file with
an extension nobody registered, and a file that is not audio at all."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from deepcontent.synth.attributes import GENRES, sample_attributes
from deepcontent.synth.audio import encode_audio, render_clip


def music(seed: int, *, seconds: float = 4.0, sample_rate: int = 44100, channels: int = 2) -> np.ndarray:
    """A generated clip, ``(n,)`` mono or ``(n, 2)`` stereo float32."""
    rng = np.random.default_rng(seed)
    y = render_clip(sample_attributes(GENRES[seed % len(GENRES)], rng), seconds=seconds, sample_rate=sample_rate,
                    seed=seed)
    y = np.asarray(y, np.float32)
    if y.ndim == 2 and channels == 1:
        return y.mean(axis=1)
    if y.ndim == 1 and channels == 2:
        return np.stack([y, y], axis=1)
    return y


def libsndfile_bytes(y: np.ndarray, sr: int, container: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=container, subtype=subtype)
    return buf.getvalue()


def ffmpeg_bytes(y: np.ndarray, sr: int, *, container: str, codec: str) -> bytes:
    """Encode with ffmpeg (PyAV): ``container`` ``ipod`` (M4A) with ``aac`` or ``alac``."""
    import av

    stereo = y.ndim == 2
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=sr, layout="stereo" if stereo else "mono")
        planar = np.ascontiguousarray((y.T if stereo else y[None, :]).astype(np.float32))
        fmt = stream.codec_context.codec.audio_formats[0].name
        if fmt == "fltp":
            frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout="stereo" if stereo else "mono")
        else:  # e.g. ALAC takes packed 16/32-bit integers
            ints = np.round(np.clip(planar, -1, 1) * 32767).astype(np.int16)
            packed = ints.T.reshape(1, -1).copy() if stereo else ints
            frame = av.AudioFrame.from_ndarray(packed, format="s16", layout="stereo" if stereo else "mono")
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def codec_files(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """``{name: (bytes, expected outcome)}``: ``ok`` or the quarantine reason."""
    s = seed * 100
    flac = libsndfile_bytes(music(s + 4, sample_rate=16000, channels=1), 16000, "FLAC", "PCM_16")
    return {
        "mp3-44k-stereo.mp3": (encode_audio(music(s + 1), sample_rate=44100, fmt="mp3"), "ok"),
        "vorbis-22k-mono.ogg": (libsndfile_bytes(music(s + 2, sample_rate=22050, channels=1), 22050, "OGG", "VORBIS"), "ok"),
        "opus-48k-stereo.opus": (libsndfile_bytes(music(s + 3, sample_rate=48000), 48000, "OGG", "OPUS"), "ok"),
        "flac-16k-mono.flac": (flac, "ok"),
        "wav-32k-stereo.wav": (libsndfile_bytes(music(s + 5, sample_rate=32000), 32000, "WAV", "PCM_16"), "ok"),
        "aiff-44k-mono.aiff": (libsndfile_bytes(music(s + 6, channels=1), 44100, "AIFF", "PCM_16"), "ok"),
        "aac-48k-stereo.m4a": (ffmpeg_bytes(music(s + 7, sample_rate=48000), 48000, container="ipod", codec="aac"), "ok"),
        "alac-44k-mono.m4a": (ffmpeg_bytes(music(s + 8, channels=1), 44100, container="ipod", codec="alac"), "ok"),
        # the content decides, not the name
        "flac-named-oddly.xyz": (libsndfile_bytes(music(s + 9, channels=1), 44100, "FLAC", "PCM_16"), "ok"),
        "corrupt.mp3": (np.random.default_rng(seed).bytes(20_000), "undecodable"),
        "truncated.flac": (flac[: len(flac) // 5], "truncated"),
    }
