"""A real-audio corpus for development and tests: free-licensed game music from pinned Debian
``main`` packages, laid out as an audio-only catalog.

::

    scripts/build_real_corpus.sh [--out data/real-corpus] [--packages a,b] [--max-files N]
    python -m deepcontent.corpus ...            # the same
    scripts/build_real_corpus.sh --update-lock  # re-pin to what apt offers now (review the diff)

The packages and their exact versions, architectures, sizes and SHA-256 are pinned in a lock
file (``scripts/real_corpus.lock``). Each ``.deb`` is fetched with ``apt-get download PKG=VERSION``
into a cache (nothing is installed), checked against the lock, and its data archive streamed
through ``dpkg-deb --fsys-tarfile``. Of its members only music is kept:

1. an audio extension (:data:`AUDIO_EXTENSIONS`; tracker modules, :data:`MODULE_EXTENSIONS`,
   only when the project's decoder reads them, which libsndfile and this ffmpeg build do not);
2. no sound-effect marker in the path (:data:`SFX_TOKENS`: ``sfx/``, ``sounds/``, ``voices/``,
   ``*_speech.ogg``, ...), with per-package exceptions where a package keeps its music among its
   sound effects (:data:`PACKAGE_RULES`);
3. at least ``min_seconds`` long (30 s by default; the header decides, then the decode);
4. decodes completely with the project's own decoder
   (:func:`deepcontent.audio.features.decode_mono`: libsndfile, then ffmpeg);
5. not byte-identical to a track already kept (SHA-256 over the whole corpus, the first by
   package order, then archive order, wins).

Every audio member that is not kept is listed in ``dropped.csv`` with its reason. The output::

    <out>/<package>/<path below usr/share[/games]>   the music, as packaged
    <out>/<package>/copyright.txt                    the package's debian/copyright, verbatim
    <out>/tracks.csv                                 one row per track: path, package, version, ...
    <out>/dropped.csv                                every audio member left out, with its reason
    <out>/corpus.json                                the manifest (pins, parameters, every member)

The first folder level is the package, so the folder is at once an audio-only catalog
(``sources.catalog=folder``: artist = package) and a transfer folder (label = package);
``tracks.csv`` carries each track's package for package-level splits. A second run with the
same lock and parameters verifies the outputs against the manifest (sizes and SHA-256) and
re-uses them: nothing is downloaded or extracted again, and it prints the same summary.

The pure parts (:func:`parse_lock`, :func:`path_verdict`, :func:`select_tracks`,
:func:`parse_copyright`, :func:`track_license`, :func:`scan_tar`) take bytes, text or tar
streams; only :func:`fetch_deb`, :func:`scan_deb` and :func:`build` touch apt, dpkg and the disk.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fnmatch
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from deepcontent.errors import DeepcontentError

__all__ = [
    "AUDIO_EXTENSIONS",
    "MODULE_EXTENSIONS",
    "PACKAGE_RULES",
    "SFX_TOKENS",
    "ArchiveUnreachable",
    "BuildParams",
    "BuildResult",
    "Copyright",
    "CorpusError",
    "Pin",
    "PinUnavailable",
    "build",
    "fetch_deb",
    "format_lock",
    "format_summary",
    "main",
    "parse_copyright",
    "parse_lock",
    "path_verdict",
    "read_lock",
    "scan_deb",
    "scan_tar",
    "select_tracks",
    "track_license",
    "update_lock",
]

#: The repository's lock file (found next to the source tree in a checkout).
DEFAULT_LOCK = Path(__file__).resolve().parents[2] / "scripts" / "real_corpus.lock"
DEFAULT_OUT = Path("data/real-corpus")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepcontent" / "real-corpus" / "debs"
MANIFEST = "corpus.json"
TRACKS_CSV = "tracks.csv"
DROPPED_CSV = "dropped.csv"
LICENSE_FILE = "copyright.txt"  # .txt: ingest.non_audio_extensions, so never taken for audio
MANIFEST_FORMAT = 1

#: Extensions of the audio formats the decoder reads (the content decides the codec).
AUDIO_EXTENSIONS = frozenset({".ogg", ".oga", ".opus", ".mp3", ".flac", ".wav", ".m4a"})
#: Tracker modules: kept only if the decoder reads them. libsndfile reads none and the PyAV
#: ffmpeg build has no module demuxer (libopenmpt / libmodplug), so today they are dropped as
#: ``tracker_module`` (tests/test_real_corpus.py checks it against the decoder).
MODULE_EXTENSIONS = frozenset({".mod", ".xm", ".it", ".s3m"})
#: A path token (a folder name or a file name, split at non-alphanumerics, lower-cased) that marks
#: sound effects, voices or speech, not music.
SFX_TOKENS = frozenset({"sfx", "soundfx", "sound", "sounds", "effect", "effects", "voice", "voices", "speech",
                        "codriver"})
#: Where a package breaks the generic rules, after looking at what it holds (the globs match the
#: path inside the .deb): ``keep`` overrides the sound-effect markers, ``drop`` removes what
#: passes them but is no music.
PACKAGE_RULES: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
    "freeorion-data": {"keep": (("usr/share/games/freeorion/default/data/sound/artificial_intelligence_v3.ogg",
                                 "the game's one music track (10 min), stored among its sound effects"),)},
    "supertuxkart-data": {"drop": (("*/steamLocomotive.ogg", "a steam-locomotive ambience loop, not music"),)},
}
#: Why an audio member is left out (``dropped.csv``'s ``reason``).
REASONS = {
    "sound_effect_path": "its path marks sound effects, voices or speech (SFX_TOKENS)",
    "package_rule": "a package rule drops it (PACKAGE_RULES)",
    "link": "a symbolic or hard link inside the package (its target is considered instead)",
    "tracker_module": "a tracker module, which the decoder does not read",
    "undecodable": "the decoder cannot read it, or not completely",
    "too_short": "shorter than the length floor (min_seconds)",
    "over_limit": "beyond the per-package file limit (max_files)",
    "duplicate": "byte-identical (SHA-256) to a track kept earlier in package order",
}
_PREFIXES = ("usr/share/games/", "usr/share/")
_DECODE_MAX_SECONDS = 4 * 3600.0  # no cap on the music itself; only a bound on memory
#: Bump when what a scan records changes meaning: every package is scanned again.
SCAN_VERSION = 1


class CorpusError(DeepcontentError, RuntimeError):
    """The corpus cannot be built; the message names the package, file or command."""


class PinUnavailable(CorpusError):
    """A pinned package version is not offered by the configured apt sources any more."""


class ArchiveUnreachable(CorpusError):
    """apt could not reach the archive (no network, DNS, proxy)."""


# ----------------------------------------------------------------------------------- the lock
@dataclass(frozen=True)
class Pin:
    """One locked package: what ``apt-get download PKG=VERSION`` must return."""

    package: str
    version: str
    architecture: str
    size: int
    sha256: str
    filename: str  # the archive's pool path, for reference (snapshot.debian.org keeps old ones)

    @property
    def deb_name(self) -> str:
        """The cache file name, as apt names it (an epoch's ``:`` becomes ``%3a``)."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"

    @property
    def spec(self) -> str:
        return f"{self.package}={self.version}"


_LOCK_HEADER = """\
# The real-audio corpus's packages (scripts/build_real_corpus.sh, src/deepcontent/corpus.py),
# in the order that decides which copy of a byte-identical track is kept.
# Debian 12 "bookworm" main, as `apt-cache show PKG` reports it. Every .deb is fetched with
# `apt-get download PKG=VERSION` and must match size and sha256 exactly.
# Re-pin (after `apt-get update`) with `scripts/build_real_corpus.sh --update-lock`, then review
# the diff and the corpus summary: versions, sizes and track counts change.
# package version architecture size sha256 pool-path
"""


def parse_lock(text: str, *, source: str = "lock") -> list[Pin]:
    """Pins from a lock file: one package a line, ``package version architecture size sha256
    pool-path`` separated by whitespace; ``#`` comments and blank lines are skipped.

    Raises
    ------
    CorpusError
        Naming ``source`` and the line: wrong field count, a size that is not an integer, a
        sha256 that is not 64 hex digits, a package listed twice; or no package at all.
    """
    pins: list[Pin] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 6:
            raise CorpusError(f"{source} line {n}: expected 6 fields (package version architecture size sha256 "
                              f"pool-path), got {len(parts)}: {raw!r}")
        package, version, arch, size, sha, filename = parts
        if not size.isdigit():
            raise CorpusError(f"{source} line {n}: size {size!r} of {package} is not a whole number of bytes")
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise CorpusError(f"{source} line {n}: sha256 {sha!r} of {package} is not 64 lower-case hex digits")
        if package in seen:
            raise CorpusError(f"{source} line {n}: package {package} is listed twice")
        seen.add(package)
        pins.append(Pin(package, version, arch, int(size), sha, filename))
    if not pins:
        raise CorpusError(f"{source} pins no package")
    return pins


def format_lock(pins: Iterable[Pin]) -> str:
    """The lock file's text for ``pins`` (the inverse of :func:`parse_lock`)."""
    pins = list(pins)
    w = [max(len(getattr(p, f)) for p in pins) for f in ("package", "version", "architecture")]
    ws = max(len(str(p.size)) for p in pins)
    rows = [f"{p.package:<{w[0]}} {p.version:<{w[1]}} {p.architecture:<{w[2]}} {p.size:>{ws}} {p.sha256} {p.filename}"
            for p in pins]
    return _LOCK_HEADER + "\n".join(rows) + "\n"


def read_lock(path: str | os.PathLike) -> list[Pin]:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"lock file {path} not found (pass --lock FILE)")
    return parse_lock(path.read_text(encoding="utf-8"), source=str(path))


# ------------------------------------------------------------------------------------ apt / dpkg
def _run(cmd: Sequence[str], *, cwd: str | os.PathLike | None = None, timeout: float = 3600.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})
    except FileNotFoundError:
        raise CorpusError(f"{cmd[0]} not found: the real-audio corpus needs apt and dpkg (Debian or Ubuntu)") from None
    except subprocess.TimeoutExpired:
        raise ArchiveUnreachable(f"{' '.join(cmd)} did not finish within {timeout:.0f} s") from None


def apt_policy(package: str, *, apt_cache: str = "apt-cache") -> str:
    """``apt-cache policy PKG`` (what the configured sources offer), or why it is not known."""
    try:
        out = _run([apt_cache, "policy", package], timeout=60)
    except CorpusError as exc:
        return str(exc)
    text = (out.stdout + out.stderr).strip()
    return text or f"apt knows no package {package} (no package lists? run apt-get update)"


def apt_candidate(package: str, *, apt_cache: str = "apt-cache") -> Pin:
    """The pin of what apt would download for ``package`` now (``apt-cache show``)."""
    out = _run([apt_cache, "show", "--no-all-versions", package], timeout=60)
    fields: dict[str, str] = {}
    for line in out.stdout.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and not line[0].isspace():
            fields[key.strip()] = value.strip()
    need = ("Version", "Architecture", "Size", "SHA256", "Filename")
    if out.returncode != 0 or any(k not in fields for k in need):
        raise PinUnavailable(f"apt-cache offers no {package}: {(out.stderr or out.stdout).strip()[:300]!r} "
                             f"(run apt-get update; is the Debian main archive in the apt sources?)")
    return Pin(package, fields["Version"], fields["Architecture"], int(fields["Size"]), fields["SHA256"],
               fields["Filename"])


_UNREACHABLE = re.compile(r"Could not resolve|Temporary failure resolving|Failed to fetch|Could not connect|"
                          r"Unable to connect|Connection failed|Connection timed out|Network is unreachable|"
                          r"No route to host|Connection refused|timed out", re.I)
_GONE = re.compile(r"Version '[^']*' for '[^']*' was not found|Unable to locate package|has no installation candidate|"
                   r"No packages found", re.I)


def _gone_message(pin: Pin, detail: str, apt_cache: str) -> str:
    return (f"pinned package {pin.spec} ({pin.architecture}) is not offered by the apt sources any more: {detail}\n"
            f"What the archive offers now (apt-cache policy {pin.package}):\n"
            f"{apt_policy(pin.package, apt_cache=apt_cache)}\n"
            f"To move on: `apt-get update`, then `scripts/build_real_corpus.sh --update-lock` re-pins every "
            f"package to what apt offers (review the diff of scripts/real_corpus.lock and the new summary). "
            f"The pinned bytes stay on snapshot.debian.org ({pin.filename}, sha256 {pin.sha256}).")


def file_sha256(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch_deb(pin: Pin, cache: str | os.PathLike, *, apt_get: str = "apt-get",
              apt_cache: str = "apt-cache") -> tuple[Path, bool]:
    """The pinned ``.deb`` in ``cache``, downloaded with ``apt-get download PKG=VERSION`` unless a
    verified copy is there. Returns ``(path, downloaded)``.

    Raises
    ------
    PinUnavailable
        The version is gone from the apt sources (the message shows ``apt-cache policy`` and how
        to update the lock).
    ArchiveUnreachable
        apt could not reach the archive.
    CorpusError
        The downloaded file's size or sha256 differs from the lock (it is not kept).
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / pin.deb_name
    if dest.is_file():
        if dest.stat().st_size == pin.size and file_sha256(dest) == pin.sha256:
            return dest, False
        dest.unlink()  # a partial or foreign file: fetch it again
    with tempfile.TemporaryDirectory(prefix=f".{pin.package}-", dir=cache) as tmp:
        os.chmod(tmp, 0o755)
        cmd = [apt_get, "download", "-q", "-o", "Acquire::http::Timeout=30", "-o", "Acquire::Retries=1"]
        if os.geteuid() == 0:  # root: apt would drop to _apt, who cannot write here (it warns, then downloads as root)
            cmd += ["-o", "APT::Sandbox::User=root"]
        out = _run(cmd + [pin.spec], cwd=tmp)
        text = (out.stderr + "\n" + out.stdout).strip()
        debs = list(Path(tmp).glob("*.deb"))
        if out.returncode != 0 or len(debs) != 1:
            lines = [ln for ln in text.splitlines() if ln.startswith(("E:", "W:", "Err"))] or text.splitlines()[-3:]
            detail = " / ".join(ln.strip() for ln in lines)[:600] or f"exit status {out.returncode}"
            if _GONE.search(text) or re.search(r"\b404\b", text):  # 404: the lists name a file the pool dropped
                raise PinUnavailable(_gone_message(pin, detail, apt_cache))
            if _UNREACHABLE.search(text):
                raise ArchiveUnreachable(f"apt-get download {pin.spec} could not reach the archive: {detail}")
            raise CorpusError(f"apt-get download {pin.spec} failed: {detail}")
        got = debs[0]
        size, sha = got.stat().st_size, file_sha256(got)
        if (size, sha) != (pin.size, pin.sha256):
            raise CorpusError(f"{pin.spec}: the archive's .deb has {size} bytes and sha256 {sha}, the lock pins "
                              f"{pin.size} bytes and sha256 {pin.sha256}: not the pinned bytes, not used (a broken "
                              f"mirror or proxy, or the archive re-published the version)")
        os.replace(got, dest)
    return dest, True


# --------------------------------------------------------------------------------- filters
def corpus_path(package: str, source: str) -> str:
    """Where a member lands in the corpus: ``<package>/<path below usr/share/games or usr/share>``."""
    rel = source
    for prefix in _PREFIXES:
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
            break
    rel = posixpath.normpath(rel)
    if rel.startswith(("../", "/")) or rel in ("..", ".", ""):
        raise CorpusError(f"{package}: member {source!r} would land outside its folder")
    return f"{package}/{rel}"


def _tokens(source: str) -> set[str]:
    return {t for part in source.lower().split("/") for t in re.split(r"[^a-z0-9]+", part) if t}


def path_verdict(package: str, source: str) -> tuple[str, str] | None:
    """Whether a member is an audio candidate by its path alone (pure: no bytes read).

    Returns
    -------
    None
        Not audio by its extension: not a candidate at all (not listed anywhere).
    ``("candidate", detail)``
        Read it (detail says why, e.g. a package rule's keep).
    ``(reason, detail)``
        Left out: ``sound_effect_path`` or ``package_rule``.
    """
    ext = posixpath.splitext(source)[1].lower()
    if ext not in AUDIO_EXTENSIONS and ext not in MODULE_EXTENSIONS:
        return None
    rules = PACKAGE_RULES.get(package, {})
    for pattern, why in rules.get("keep", ()):
        if fnmatch.fnmatchcase(source, pattern):
            return "candidate", f"kept by a package rule: {why}"
    for pattern, why in rules.get("drop", ()):
        if fnmatch.fnmatchcase(source, pattern):
            return "package_rule", why
    marks = sorted(_tokens(source) & SFX_TOKENS)
    if marks:
        return "sound_effect_path", f"path token(s) {', '.join(marks)} mark sound effects"
    return "candidate", ""


def _looks_like_module(data: bytes) -> bool:
    return (data[:17] == b"Extended Module: " or data[:4] == b"IMPM" or data[44:48] == b"SCRM"
            or data[1080:1084] in (b"M.K.", b"M!K!", b"FLT4", b"FLT8", b"4CHN", b"6CHN", b"8CHN"))


@dataclass
class AudioInfo:
    duration_s: float
    codec: str
    sample_rate: int
    channels: int


class _NotAudio(ValueError):
    pass


def probe_audio(data: bytes) -> AudioInfo:
    """Duration, codec, rate and channels from the header (libsndfile, then ffmpeg): no decode.

    Raises
    ------
    ValueError
        Neither recognises the bytes as audio.
    """
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.samplerate <= 0:
                raise _NotAudio(f"invalid sample rate {f.samplerate}")
            return AudioInfo(f.frames / f.samplerate, f"{f.format}/{f.subtype}".lower(), int(f.samplerate),
                             int(f.channels))
    except _NotAudio:
        raise
    except (sf.SoundFileError, RuntimeError) as exc:  # the message without the object's address: reproducible
        first = str(getattr(exc, "error_string", None) or exc).splitlines()[0][:120] or type(exc).__name__
    try:
        import av

        with av.open(io.BytesIO(data), mode="r") as c:
            if not c.streams.audio:
                raise _NotAudio(f"a {c.format.name} file without an audio stream")
            s = c.streams.audio[0]
            if s.duration is not None and s.time_base is not None:
                dur = float(s.duration * s.time_base)
            else:
                dur = (c.duration or 0) / 1e6
            return AudioInfo(dur, f"{c.format.name}/{s.codec_context.name}".lower(), int(s.codec_context.sample_rate or 0),
                             int(s.codec_context.channels or 0))
    except _NotAudio:
        raise
    except Exception as exc:  # av.error.FFmpegError and friends
        raise _NotAudio(f"not recognised as audio (libsndfile: {first}; ffmpeg: "
                         f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None


def decode_seconds(data: bytes) -> float:
    """Seconds that decode with the project's decoder (every sample; ``truncated`` below the
    spectrogram stage's ``min_decoded_fraction`` of the declared length).

    Raises
    ------
    deepcontent.audio.features.AudioError
    """
    from deepcontent.audio.features import decode_mono
    from deepcontent.audio.settings import MelSettings

    y, sr = decode_mono(data, max_seconds=_DECODE_MAX_SECONDS, min_decoded_fraction=MelSettings().min_decoded_fraction)
    return y.size / sr


# ----------------------------------------------------------------------------------- licences
@dataclass
class Copyright:
    """A ``debian/copyright`` file, parsed: machine-readable (DEP-5) ``Files`` paragraphs with
    their licence, or, for a free-form file, the licences its text mentions."""

    dep5: bool
    paragraphs: list[tuple[tuple[str, ...], str, str]] = field(default_factory=list)  # (globs, licence, copyright)
    mentions: tuple[str, ...] = ()
    sha256: str = ""

    def licenses(self) -> list[str]:
        seen = dict.fromkeys(lic for _, lic, _ in self.paragraphs if lic)
        return list(seen) if self.dep5 else list(self.mentions)


_MENTIONS = (
    ("GPL-3+", r"General Public License,? (?:as published by[^.]*?)?version 3 or (?:\(at your option\) )?(?:any )?later"),
    ("GPL-2+", r"General Public License,? (?:as published by[^.]*?)?(?:either )?version 2(?:,| of the License,)? or "
               r"(?:\(at your option\) )?(?:any )?later"),
    ("GPL", r"GNU General Public License|common-licenses/GPL"),
    ("LGPL", r"Lesser General Public License|common-licenses/LGPL"),
    ("CC-BY-SA", r"Creative Commons Attribution[- ]Share ?Alike|CC[- ]BY[- ]SA"),
    ("CC-BY", r"Creative Commons Attribution(?![- ]Share)|licenses/by/\d"),
    ("CC0", r"\bCC0\b|publicdomain/zero"),
    ("ISC", r"\bISC license"),
    ("MIT", r"\bMIT license|Permission is hereby granted, free of charge"),
    ("BSD", r"Redistribution and use in source and binary forms"),
    ("public-domain", r"public domain"),
)


def parse_copyright(text: str) -> Copyright:
    """Parse a ``debian/copyright`` file (pure).

    A DEP-5 file (its first paragraph has ``Format:``) gives one ``(globs, licence short name,
    copyright)`` per ``Files`` paragraph, in order; any other file gives the licences its text
    mentions (:data:`_MENTIONS`, best effort: the file itself is authoritative).
    """
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    paras = [p for p in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")) if p.strip()]
    if not paras or not re.match(r"(?im)^format:", paras[0]):
        flat = re.sub(r"\s+", " ", text)
        mentions = tuple(name for name, rx in _MENTIONS if re.search(rx, flat, re.I))
        if "GPL-2+" in mentions or "GPL-3+" in mentions:
            mentions = tuple(m for m in mentions if m != "GPL")
        return Copyright(dep5=False, mentions=mentions, sha256=sha)
    out = Copyright(dep5=True, sha256=sha)
    for para in paras:
        fields: dict[str, str] = {}
        key = None
        for line in para.split("\n"):
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "files" in fields:
            globs = tuple(g.removeprefix("./") for g in fields["files"].split())
            lic = fields.get("license", "").split("\n", 1)[0].strip()
            holder = re.sub(r"\s+", " ", fields.get("copyright", "")).strip()
            out.paragraphs.append((globs, lic, holder))
    return out


def _below_data_root(source: str) -> str:
    """An installed path below the game's data folder (``usr/share/games/<game>/``), the part
    that can repeat the upstream tree's layout."""
    rel = source
    for prefix in _PREFIXES:
        if rel.startswith(prefix):
            rel = rel[len(prefix):]
            break
    head, sep, tail = rel.partition("/")
    return tail if sep else rel


def _glob_matches(glob: str, source: str) -> bool:
    """A DEP-5 glob (relative to the upstream tree) against an installed path: it matches a
    trailing part of the path below the game's data folder, and may lose leading folders of its
    own (``data/music/*`` matches ``usr/share/games/supertux2/music/x.ogg``) as long as a literal
    folder is left in it. The data folder's own name is not matched (``hedgewars/*``, the
    engine's sources, is not ``usr/share/games/hedgewars/Data/Music/x.ogg``)."""
    if glob.startswith("debian/"):  # the packaging itself, never installed music
        return False
    parts = _below_data_root(source).split("/")
    candidates = [glob]
    g = glob.split("/")
    for k in range(1, len(g) - 1):
        if not any(ch in g[k] for ch in "*?["):
            candidates.append("/".join(g[k:]))
    return any(fnmatch.fnmatchcase("/".join(parts[i:]), c) for c in candidates for i in range(len(parts)))


def track_license(cr: Copyright, source: str) -> str:
    """The licence ``debian/copyright`` gives a member (DEP-5: the last ``Files`` paragraph whose
    glob matches; free-form: what the text mentions, joined with `` / ``), best effort."""
    if not cr.dep5:
        return " / ".join(cr.mentions) if cr.mentions else "see copyright.txt"
    found = ""
    for globs, lic, _ in cr.paragraphs:
        if any(_glob_matches(g, source) for g in globs):
            found = lic or found
    return found or "see copyright.txt"


# --------------------------------------------------------------------------------- the scan
@dataclass(frozen=True)
class BuildParams:
    """What decides which members are kept; a change re-scans every package."""

    min_seconds: float = 30.0
    max_files: int | None = None  # per package, the first decodable ones in archive order

    def key(self) -> str:
        rules = json.dumps({"audio": sorted(AUDIO_EXTENSIONS), "modules": sorted(MODULE_EXTENSIONS),
                            "sfx": sorted(SFX_TOKENS), "packages": PACKAGE_RULES, "prefixes": _PREFIXES,
                            "min_seconds": self.min_seconds, "max_files": self.max_files,
                            "license_file": LICENSE_FILE, "format": MANIFEST_FORMAT, "scan": SCAN_VERSION},
                           sort_keys=True)
        return hashlib.sha256(rules.encode()).hexdigest()[:16]


def _member_path(name: str) -> str:
    """``./usr/share/x`` -> ``usr/share/x``."""
    return posixpath.normpath(name[2:] if name.startswith("./") else name).lstrip("/")


def _write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def scan_tar(tar: tarfile.TarFile, pin: Pin, *, out: str | os.PathLike, params: BuildParams) -> dict:
    """Walk a package's data archive (a streaming ``tarfile``), write every music candidate to
    ``out/<package>/…`` and its copyright file beside it, and return the package's record:
    every audio member with its verdict (``status`` ``candidate`` or ``dropped`` + ``reason``)
    and, for candidates, SHA-256, duration (decoded), codec, rate, channels and licence.

    Duplicates are not decided here (:func:`select_tracks` does, over every package)."""
    out = Path(out)
    members: list[dict] = []
    copyright_text: str | None = None
    other = 0
    candidates = 0
    doc = f"usr/share/doc/{pin.package}/copyright"
    for m in tar:
        if m.isdir():
            continue
        source = _member_path(m.name)
        if source == doc and m.isfile():
            copyright_text = tar.extractfile(m).read().decode("utf-8", errors="replace")
            continue
        verdict = path_verdict(pin.package, source)
        if verdict is None:
            other += 1
            continue
        row = {"source": source, "path": corpus_path(pin.package, source), "bytes": int(m.size)}
        status, detail = verdict
        if not m.isfile():
            row.update(status="dropped", reason="link", detail=f"link to {m.linkname}", bytes=0)
            members.append(row)
            continue
        if status != "candidate":
            row.update(status="dropped", reason=status, detail=detail)
            members.append(row)
            continue
        if params.max_files is not None and candidates >= params.max_files:
            row.update(status="dropped", reason="over_limit", detail=f"max_files={params.max_files}")
            members.append(row)
            continue
        data = tar.extractfile(m).read()
        row["sha256"] = hashlib.sha256(data).hexdigest()
        try:
            info = probe_audio(data)
        except ValueError as exc:
            ext = posixpath.splitext(source)[1].lower()
            if ext in MODULE_EXTENSIONS and _looks_like_module(data):
                row.update(status="dropped", reason="tracker_module", detail=f"the decoder reads no tracker modules: {exc}")
            else:
                row.update(status="dropped", reason="undecodable", detail=str(exc))
            members.append(row)
            continue
        row.update(codec=info.codec, sample_rate=info.sample_rate, channels=info.channels,
                   duration_s=round(info.duration_s, 3))
        if info.duration_s < params.min_seconds:
            row.update(status="dropped", reason="too_short", detail=f"{info.duration_s:.1f} s < {params.min_seconds:g} s")
            members.append(row)
            continue
        try:
            seconds = decode_seconds(data)
        except DeepcontentError as exc:  # AudioError
            row.update(status="dropped", reason="undecodable", detail=str(exc)[:300])
            members.append(row)
            continue
        row["duration_s"] = round(seconds, 3)
        if seconds < params.min_seconds:
            row.update(status="dropped", reason="too_short",
                       detail=f"{seconds:.1f} s decode (header: {info.duration_s:.1f} s) < {params.min_seconds:g} s")
            members.append(row)
            continue
        row.update(status="candidate", detail=detail)
        _write_atomic(out / row["path"], data)
        members.append(row)
        candidates += 1
    cr = parse_copyright(copyright_text) if copyright_text is not None else None
    if copyright_text is not None:
        _write_atomic(out / pin.package / LICENSE_FILE, copyright_text.encode("utf-8"))
    return {"package": pin.package, "version": pin.version, "architecture": pin.architecture,
            "deb_sha256": pin.sha256, "deb_size": pin.size, "params": params.key(),
            "copyright": None if cr is None else {"file": f"{pin.package}/{LICENSE_FILE}", "sha256": cr.sha256,
                                                   "dep5": cr.dep5, "licenses": cr.licenses()},
            "other_members": other, "members": members}


def scan_deb(deb: str | os.PathLike, pin: Pin, *, out: str | os.PathLike, params: BuildParams) -> dict:
    """:func:`scan_tar` over a ``.deb``'s data archive (``dpkg-deb --fsys-tarfile``, streamed),
    after clearing the package's folder."""
    out = Path(out)
    shutil.rmtree(out / pin.package, ignore_errors=True)
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise CorpusError("dpkg-deb not found: the real-audio corpus needs dpkg (Debian or Ubuntu)") from None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            record = scan_tar(tar, pin, out=out, params=params)
    except tarfile.TarError as exc:
        proc.kill()
        raise CorpusError(f"{deb}: its data archive does not read: {exc}") from None
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        proc.wait()
    if proc.returncode != 0:
        raise CorpusError(f"dpkg-deb --fsys-tarfile {deb} failed ({proc.returncode}): {err.strip()[:300]}")
    return record


def extract_members(deb: str | os.PathLike, wanted: dict[str, Path]) -> set[str]:
    """Write the members ``wanted`` (``{path in the .deb: destination}``) from a ``.deb``;
    returns the members found."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    found = set()
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                source = _member_path(m.name)
                if m.isfile() and source in wanted:
                    _write_atomic(wanted[source], tar.extractfile(m).read())
                    found.add(source)
    finally:
        proc.stdout.close()
        proc.wait()
    return found


# ---------------------------------------------------------------------------- selection
def select_tracks(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Kept tracks and dropped members over every package, in package then archive order: a
    candidate whose bytes equal a kept track's is dropped as ``duplicate`` (pure).

    Returns
    -------
    kept : list of dict
        The candidate rows, each with ``package`` and ``version`` added.
    dropped : list of dict
        Every other audio member, with ``package``, ``reason`` and ``detail``.
    """
    kept, dropped = [], []
    first: dict[str, str] = {}
    for rec in records:
        for row in rec["members"]:
            row = {**row, "package": rec["package"], "version": rec["version"]}
            if row["status"] != "candidate":
                dropped.append(row)
            elif row["sha256"] in first:
                dropped.append({**row, "status": "dropped", "reason": "duplicate",
                                "detail": f"same bytes as {first[row['sha256']]}"})
            else:
                first[row["sha256"]] = row["path"]
                kept.append(row)
    return kept, dropped


# ----------------------------------------------------------------------------------- build
@dataclass
class BuildResult:
    out: Path
    records: list[dict]
    kept: list[dict]
    dropped: list[dict]
    pins: list[Pin]
    downloaded: list[str] = field(default_factory=list)
    scanned: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    repaired: int = 0
    removed: int = 0
    seconds: float = 0.0


def _load_manifest(out: Path) -> dict:
    try:
        m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return m if m.get("format") == MANIFEST_FORMAT else {}
    except (OSError, ValueError):
        return {}


def _reusable(rec: dict | None, pin: Pin, params: BuildParams) -> bool:
    """A manifest record still describes the pin and parameters (its files are checked after
    selection, when it is known which of them must be on disk)."""
    return bool(rec) and rec.get("deb_sha256") == pin.sha256 and rec.get("version") == pin.version \
        and rec.get("params") == params.key()


def _scan_job(deb: str, pin: Pin, out: str, params: BuildParams) -> tuple[dict, float]:
    t0 = time.monotonic()
    return scan_deb(deb, pin, out=out, params=params), time.monotonic() - t0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(pins: Sequence[Pin], *, out: str | os.PathLike = DEFAULT_OUT, cache: str | os.PathLike = DEFAULT_CACHE,
          params: BuildParams = BuildParams(), jobs: int = 1, all_packages: Iterable[str] = (),
          apt_get: str = "apt-get", apt_cache: str = "apt-cache", log: Callable[[str], None] = _log) -> BuildResult:
    """Build (or verify and re-use) the corpus of ``pins`` in ``out``.

    Parameters
    ----------
    pins : sequence of Pin
        The packages, in the order that decides duplicates.
    out, cache : path
        The corpus folder; where the ``.deb`` files are kept.
    params : BuildParams
    jobs : int
        Packages scanned at once (each its own process).
    all_packages : iterable of str
        Every package of the lock: a folder of one of them that is not in ``pins`` is removed
        (the folder holds exactly the selection); nothing else in ``out`` is touched.
    apt_get, apt_cache : str
        The commands (tests put fakes here).
    """
    t0 = time.monotonic()
    out, cache = Path(out), Path(cache)
    out.mkdir(parents=True, exist_ok=True)
    old = {r["package"]: r for r in _load_manifest(out).get("packages", [])}
    res = BuildResult(out=out, records=[], kept=[], dropped=[], pins=list(pins))
    debs: dict[str, Path] = {}

    def deb_of(pin: Pin) -> Path:
        if pin.package not in debs:
            path, downloaded = fetch_deb(pin, cache, apt_get=apt_get, apt_cache=apt_cache)
            debs[pin.package] = path
            if downloaded:
                res.downloaded.append(pin.package)
                log(f"  downloaded {pin.deb_name} ({_size(pin.size)}), sha256 verified")
        return debs[pin.package]

    records: dict[str, dict] = {}
    todo: list[Pin] = []
    for pin in pins:
        if _reusable(old.get(pin.package), pin, params):
            records[pin.package] = old[pin.package]
            res.reused.append(pin.package)
        else:
            todo.append(pin)
    if todo:
        log(f"fetching {len(todo)} package(s) into {cache}")
        t1 = time.monotonic()
        for pin in todo:  # every download before any scan: a gone pin fails before minutes of work
            deb_of(pin)
        log(f"  {len(todo)} .deb(s) verified ({_size(sum(p.size for p in todo))}, {len(res.downloaded)} downloaded) "
            f"in {time.monotonic() - t1:.0f} s")
        log(f"scanning {len(todo)} package(s) with {min(jobs, len(todo))} process(es)")
        order = sorted(todo, key=lambda p: -p.size)  # the largest first: the pool ends together
        if jobs <= 1 or len(todo) == 1:
            for pin in order:
                rec, took = _scan_job(str(debs[pin.package]), pin, str(out), params)
                records[pin.package] = rec
                log(f"  {pin.package}: {_scan_line(rec)} ({took:.0f} s)")
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futs = {pool.submit(_scan_job, str(debs[p.package]), p, str(out), params): p for p in order}
                for fut in as_completed(futs):
                    pin = futs[fut]
                    rec, took = fut.result()
                    records[pin.package] = rec
                    log(f"  {pin.package}: {_scan_line(rec)} ({took:.0f} s)")
        res.scanned = [p.package for p in todo]
    res.records = [records[p.package] for p in pins]
    res.kept, res.dropped = select_tracks(res.records)

    # Bring the folder to exactly the selection: kept files verified (re-extracted if missing
    # or changed), everything else of these packages removed.
    # A package's licence file goes with its music: only packages with kept tracks get a folder.
    fresh = set(res.scanned)
    repair: dict[str, dict[str, Path]] = {}
    wanted = [(row["package"], row["source"], row["path"], row["bytes"], row["sha256"]) for row in res.kept]
    with_music = {row["package"] for row in res.kept}
    for rec in res.records:
        cr = rec.get("copyright")
        if cr and rec["package"] in with_music:
            wanted.append((rec["package"], f"usr/share/doc/{rec['package']}/copyright", cr["file"], None, cr["sha256"]))
    for package, source, path, size, sha in wanted:
        dest = out / path
        if package in fresh and dest.is_file():
            continue
        if not (dest.is_file() and (size is None or dest.stat().st_size == size) and file_sha256(dest) == sha):
            repair.setdefault(package, {})[source] = dest
    for pin in pins:
        if pin.package in repair:
            want = repair[pin.package]
            found = extract_members(deb_of(pin), want)
            expected = {source: sha for package, source, _, _, sha in wanted if package == pin.package}
            bad = sorted(set(want) - found) + sorted(s for s in found if file_sha256(want[s]) != expected[s])
            if bad:
                raise CorpusError(f"{pin.spec}: members {bad[:3]} of the manifest are not in the .deb as recorded; "
                                  f"delete {out / MANIFEST} and build again")
            res.repaired += len(want)
    if res.repaired:
        log(f"  re-extracted {res.repaired} file(s) that were missing or changed")
    licences: dict[str, Copyright | None] = {}
    for row in res.kept:  # from the copyright file beside the music (verified above)
        pkg = row["package"]
        if pkg not in licences:
            f = out / pkg / LICENSE_FILE
            licences[pkg] = parse_copyright(f.read_text(encoding="utf-8")) if f.is_file() else None
        cr = licences[pkg]
        row["license"] = track_license(cr, row["source"]) if cr else "no copyright file in the package"
    keep_files = {path for _, _, path, _, _ in wanted}
    selected = {p.package for p in pins}
    for name in sorted(set(all_packages) | selected):
        folder = out / name
        if not folder.is_dir() or folder.is_symlink():
            continue
        if name not in selected:
            shutil.rmtree(folder)
            res.removed += 1
            continue
        for path in sorted(folder.rglob("*"), reverse=True):
            rel = path.relative_to(out).as_posix()
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            elif rel not in keep_files:
                path.unlink()  # a duplicate, a licence without music, or a leftover of an earlier run
                res.removed += name not in fresh
        if not any(folder.iterdir()):
            folder.rmdir()
    _write_outputs(out, res, params)
    res.seconds = time.monotonic() - t0
    return res


def _scan_line(rec: dict) -> str:
    c = Counter(r.get("reason", "candidate") for r in rec["members"])
    cand = c.pop("candidate", 0)
    return f"{cand} music candidate(s), {sum(c.values())} dropped" + (
        f" ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})" if c else "")


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    _write_atomic(path, text.encode("utf-8"))


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_outputs(out: Path, res: BuildResult, params: BuildParams) -> None:
    lic_file = {r["package"]: (r["copyright"] or {}).get("file", "") for r in res.records}
    tracks = _csv_text(
        ["path", "package", "version", "source", "duration_s", "codec", "sample_rate", "channels", "bytes", "sha256",
         "license", "license_file"],
        ([r["path"], r["package"], r["version"], r["source"], f"{r['duration_s']:.3f}", r["codec"], r["sample_rate"],
          r["channels"], r["bytes"], r["sha256"], r["license"], lic_file[r["package"]]] for r in res.kept))
    dropped = _csv_text(
        ["package", "source", "reason", "detail", "bytes", "duration_s", "sha256"],
        ([r["package"], r["source"], r["reason"], r.get("detail", ""), r["bytes"],
          "" if r.get("duration_s") is None else f"{r['duration_s']:.3f}", r.get("sha256", "")] for r in res.dropped))
    summary = summarise(res)
    manifest = {"format": MANIFEST_FORMAT, "params": {**dataclasses.asdict(params), "key": params.key()},
                "layout": "<package>/<path below usr/share/games or usr/share>; <package>/copyright.txt",
                "reasons": REASONS, "totals": summary["totals"],
                "packages": [{**rec, "summary": s} for rec, s in zip(res.records, summary["packages"])]}
    _write_if_changed(out / TRACKS_CSV, tracks)
    _write_if_changed(out / DROPPED_CSV, dropped)
    _write_if_changed(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False) + "\n")


# --------------------------------------------------------------------------------- summary
def summarise(res: BuildResult) -> dict:
    """Per package and in total: kept, dropped by reason, seconds, bytes, codecs, licences."""
    by_pkg = {p.package: {"package": p.package, "version": p.version, "deb_bytes": p.size, "kept": 0, "seconds": 0.0,
                          "bytes": 0, "dropped": Counter(), "codecs": Counter(), "licenses": Counter()}
              for p in res.pins}
    for r in res.kept:
        s = by_pkg[r["package"]]
        s["kept"] += 1
        s["seconds"] += r["duration_s"]
        s["bytes"] += r["bytes"]
        s["codecs"][r["codec"]] += 1
        s["licenses"][r["license"]] += 1
    for r in res.dropped:
        by_pkg[r["package"]]["dropped"][r["reason"]] += 1
    packages = []
    for rec in res.records:
        s = by_pkg[rec["package"]]
        cr = rec.get("copyright")
        packages.append({**s, "seconds": round(s["seconds"], 3), "dropped": dict(sorted(s["dropped"].items())),
                         "codecs": dict(s["codecs"].most_common()), "licenses": dict(s["licenses"].most_common()),
                         "copyright_licenses": [] if cr is None else cr["licenses"],
                         "copyright_dep5": None if cr is None else cr["dep5"]})
    from deepcontent.audio.settings import MelSettings

    limit = MelSettings().max_seconds
    totals = {"packages": len(packages), "packages_with_music": sum(1 for p in packages if p["kept"]),
              "deb_bytes": sum(p.size for p in res.pins), "tracks": len(res.kept),
              "seconds": round(sum(r["duration_s"] for r in res.kept), 3),
              "bytes": sum(r["bytes"] for r in res.kept),
              "dropped": dict(sorted(Counter(r["reason"] for r in res.dropped).items())),
              "codecs": dict(Counter(r["codec"] for r in res.kept).most_common()),
              "longer_than_spectrograms_max_seconds": sum(1 for r in res.kept if r["duration_s"] > limit),
              "spectrograms_max_seconds": limit,
              "longest_s": max((r["duration_s"] for r in res.kept), default=0.0)}
    return {"packages": packages, "totals": totals}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


_SHORT = {"sound_effect_path": "sfx", "package_rule": "rule", "tracker_module": "module", "undecodable": "undec",
          "too_short": "short", "over_limit": "limit", "duplicate": "dup", "link": "link"}


def format_summary(res: BuildResult) -> str:
    """The table a build prints (the same for a build and for the run that re-uses it)."""
    summ = summarise(res)
    rows = [("package", "version", ".deb", "kept", "music", "audio bytes", "dropped (reason count)")]
    for p in summ["packages"]:
        drop = " ".join(f"{_SHORT.get(k, k)} {v}" for k, v in p["dropped"].items()) or "-"
        rows.append((p["package"], p["version"], _size(p["deb_bytes"]), str(p["kept"]), _hms(p["seconds"]),
                     _size(p["bytes"]), drop))
    t = summ["totals"]
    rows.append(("total", "", _size(t["deb_bytes"]), str(t["tracks"]), _hms(t["seconds"]), _size(t["bytes"]),
                 " ".join(f"{_SHORT.get(k, k)} {v}" for k, v in t["dropped"].items())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 4, 5}
    lines = []
    for n, r in enumerate(rows):
        if n == len(rows) - 1:
            lines.append("  ".join("-" * w for w in widths))
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    lines.append("dropped: " + "; ".join(f"{_SHORT[k]} = {k}" for k in _SHORT if k in t["dropped"]))
    lines.append("")
    lines.append(f"licences of the kept tracks (from each package's debian/copyright, copied to "
                 f"<package>/{LICENSE_FILE}; best effort, the file is authoritative):")
    wp = max(len(p["package"]) for p in summ["packages"])
    for p in summ["packages"]:
        if p["kept"]:
            lic = ", ".join(f"{k} ({v})" if len(p["licenses"]) > 1 else k for k, v in p["licenses"].items())
        else:
            lic = "no tracks kept; the package declares " + (", ".join(p["copyright_licenses"][:6]) or "-")
        kind = "" if p["copyright_dep5"] in (None, True) else "  [free-form copyright file: licences it mentions]"
        lines.append(f"  {p['package']:<{wp}}  {lic}{kind}")
    lines.append("")
    codecs = ", ".join(f"{k} {v}" for k, v in t["codecs"].items()) or "-"
    lines.append(f"{t['tracks']} tracks from {t['packages_with_music']} of {t['packages']} packages, "
                 f"{t['seconds'] / 3600:.2f} h of music, {_size(t['bytes'])} in {res.out}; "
                 f"{_size(t['deb_bytes'])} of .debs. Codecs: {codecs}.")
    if t["longer_than_spectrograms_max_seconds"]:
        lines.append(f"{t['longer_than_spectrograms_max_seconds']} track(s) are longer than spectrograms.max_seconds="
                     f"{t['spectrograms_max_seconds']:g} (the longest {t['longest_s']:.0f} s): pass "
                     f"spectrograms.max_seconds={int(t['longest_s'] // 60 + 1) * 60} to keep them in the pipeline.")
    undec = [r for r in res.dropped if r["reason"] in ("undecodable", "tracker_module")]
    lines.append("Not decodable: " + ("none" if not undec else
                                      "; ".join(f"{r['package']}/{posixpath.basename(r['source'])} ({r['reason']})"
                                                for r in undec)) + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- re-pin
def update_lock(path: str | os.PathLike, *, apt_cache: str = "apt-cache") -> list[tuple[Pin, Pin]]:
    """Re-pin every package of the lock to what ``apt-cache show`` offers now; returns the
    ``(old, new)`` pairs that changed (the lock is rewritten only when something did)."""
    pins = read_lock(path)
    new = [apt_candidate(p.package, apt_cache=apt_cache) for p in pins]
    changed = [(a, b) for a, b in zip(pins, new) if a != b]
    if changed:
        Path(path).write_text(format_lock(new), encoding="utf-8")
    return changed


# ------------------------------------------------------------------------------------- CLI
def split_packages(packages: Iterable[str], *, fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(pretrain, heldout)``: the packages ordered by a seeded hash of their names, the first
    ``round(fraction · n)`` (at least one, and at least one left) to pretrain on, the rest held
    out — whole packages, so no held-out track shares a source with a pretraining one.

    >>> split_packages(["a", "b", "c", "d"], fraction=0.5, seed=0)[0].__len__()
    2
    """
    names = sorted(set(packages))
    if len(names) < 2:
        raise CorpusError(f"a package split needs at least 2 packages with music, got {names}")
    if not 0.0 < fraction < 1.0:
        raise CorpusError(f"--split-fraction must be between 0 and 1, got {fraction}")
    order = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    k = min(max(round(fraction * len(names)), 1), len(names) - 1)
    return sorted(order[:k]), sorted(order[k:])


def split_corpus(corpus: str | os.PathLike, into: str | os.PathLike, *, fraction: float, seed: int = 0) -> dict:
    """Lay a built corpus out as ``into/pretrain/<package>/…`` and ``into/heldout/<package>/…``
    (hard links, copies where the file system has none; the same relative paths), split by
    package (:func:`split_packages`), with ``into/split.json`` saying which is which. Idempotent:
    files already there are kept, files of packages no longer in a part are removed."""
    corpus, into = Path(corpus), Path(into)
    rows = list(csv.DictReader(open(corpus / TRACKS_CSV, newline="")))
    pretrain, heldout = split_packages({r["package"] for r in rows}, fraction=fraction, seed=seed)
    part_of = {**{p: "pretrain" for p in pretrain}, **{p: "heldout" for p in heldout}}
    wanted: set[Path] = set()
    for r in rows:
        src, dest = corpus / r["path"], into / part_of[r["package"]] / r["path"]
        wanted.add(dest)
        if dest.exists() and dest.stat().st_size == src.stat().st_size:
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.unlink()
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    for part in ("pretrain", "heldout"):
        for f in sorted((into / part).rglob("*"), reverse=True) if (into / part).exists() else []:
            if f.is_file() and f not in wanted:
                f.unlink()
            elif f.is_dir() and not any(f.iterdir()):
                f.rmdir()
    counts = {part: sum(1 for r in rows if part_of[r["package"]] == part) for part in ("pretrain", "heldout")}
    info = {"fraction": fraction, "seed": seed, "pretrain": pretrain, "heldout": heldout, "tracks": counts,
            "corpus": str(corpus)}
    _write_if_changed(into / "split.json", json.dumps(info, indent=2) + "\n")
    return info


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_real_corpus.sh",
        description="Build the real-audio corpus: music from pinned Debian packages (apt-get download, no "
                    "installation), laid out as an audio-only catalog. Idempotent: a second run verifies and "
                    "re-uses what is there.")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the corpus folder (default: %(default)s)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the .deb files are kept "
                                                                     "(default: %(default)s)")
    p.add_argument("--lock", type=Path, default=DEFAULT_LOCK, help="the pins (default: %(default)s)")
    p.add_argument("--packages", default=None,
                   help="comma-separated subset of the lock's packages (default: all, in lock order)")
    p.add_argument("--min-seconds", type=float, default=BuildParams.min_seconds,
                   help="length floor: shorter audio is no music track (default: %(default)s)")
    p.add_argument("--max-files", type=int, default=None,
                   help="keep at most N tracks per package (a small slice; default: no limit)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="packages scanned at once (default: %(default)s)")
    p.add_argument("--split-into", type=Path, default=None,
                   help="after building, lay the corpus out by package as DIR/pretrain/ and DIR/heldout/ "
                        "(hard links; DIR/split.json lists the packages): pretrain on one, evaluate on the other")
    p.add_argument("--split-fraction", type=float, default=0.7, help="share of packages to pretrain on (%(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the package order (%(default)s)")
    p.add_argument("--update-lock", action="store_true",
                   help="re-pin the lock to what apt-cache offers now (run apt-get update first), then stop")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.update_lock:
            changed = update_lock(args.lock)
            for a, b in changed:
                print(f"{a.package}: {a.version} ({a.size} bytes) -> {b.version} ({b.size} bytes)")
            print(f"{args.lock}: {len(changed)} pin(s) changed" + ("; review the diff and rebuild" if changed else ""))
            return 0
        pins = read_lock(args.lock)
        names = [p.package for p in pins]
        if args.packages:
            want = [s.strip() for s in args.packages.split(",") if s.strip()]
            unknown = [w for w in want if w not in names]
            if unknown:
                raise CorpusError(f"--packages {', '.join(unknown)}: not in {args.lock} (it pins {', '.join(names)})")
            pins = [p for p in pins if p.package in want]
        if args.max_files is not None and args.max_files < 1:
            raise CorpusError(f"--max-files must be at least 1, got {args.max_files}")
        params = BuildParams(min_seconds=args.min_seconds, max_files=args.max_files)
        res = build(pins, out=args.out, cache=args.cache, params=params, jobs=max(1, args.jobs), all_packages=names)
    except CorpusError as exc:
        print(f"build_real_corpus: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(res))
    did = (f"downloaded {len(res.downloaded)} .deb(s), scanned {len(res.scanned)} package(s), re-used "
           f"{len(res.reused)} verified package(s)" + (f", re-extracted {res.repaired} file(s)" if res.repaired else "")
           + (f", removed {res.removed} file(s)/folder(s) no longer in the selection" if res.removed else ""))
    print(f"{did}; {res.seconds:.0f} s. Tracks: {res.out / TRACKS_CSV}; left out: {res.out / DROPPED_CSV}; "
          f"manifest: {res.out / MANIFEST}.")
    if args.split_into is not None:
        try:
            info = split_corpus(res.out, args.split_into, fraction=args.split_fraction, seed=args.split_seed)
        except CorpusError as exc:
            print(f"build_real_corpus: error: {exc}", file=sys.stderr)
            return 2
        print(f"split by package into {args.split_into}: pretrain {info['tracks']['pretrain']} tracks of "
              f"{', '.join(info['pretrain'])}; heldout {info['tracks']['heldout']} tracks of {', '.join(info['heldout'])}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
