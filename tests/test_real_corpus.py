"""The real-audio corpus builder (src/deepcontent/corpus.py, scripts/build_real_corpus.sh).

Fast tests on fabricated files and packages (filters, duplicates, manifest, idempotence, the
errors a gone pin or an unreachable archive give), with fake ``apt-get`` / ``apt-cache`` on the
PATH; and one test that builds a tiny slice from the real Debian archive, skipped with the reason
when the archive cannot be reached from here."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from deepcontent import corpus as C

REPO = Path(__file__).resolve().parents[1]
ISSUE_PACKAGES = (
    "hedgewars-data supertux-data hyperrogue-music drascula-music pushover-data colobot-common-sounds openclonk-data "
    "fillets-ng-data widelands-data planetblupi-music-ogg boswars-data freeorion-data lincity-ng-data asc-music "
    "megaglest-data fb-music-high frozen-bubble-data xmoto-data extremetuxracer-data neverball-data "
    "trigger-rally-data supertuxkart-data").split()
SR = 8000
MIN_S = 2.0  # the fabricated "music" is 3 s, the "jingle" 1 s: small files, same rules
PARAMS = C.BuildParams(min_seconds=MIN_S)


def tone(seconds: float, freq: float = 440.0, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    t = np.arange(int(seconds * SR)) / SR
    y = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, y, SR, format=fmt, subtype=subtype)
    return buf.getvalue()


XM = b"Extended Module: " + b"tune".ljust(20, b"\0") + b"\x1a" + b"FastTracker v2.00   " + b"\x04\x01" + bytes(300)
DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: game

Files: *
Copyright: 2020 The Game Team
License: GPL-2+

Files: data/music/*
Copyright: 2019 A Composer
License: CC-BY-SA-3.0

Files: debian/*
Copyright: 2021 A Debian Maintainer
License: GPL-2+
"""


def package_files(name: str, package: str | None = None, *, music_freq: float = 440.0) -> dict[str, bytes]:
    """A game data package's files (paths inside the .deb): music, a jingle, sound effects,
    a non-audio file and the copyright file."""
    root = f"usr/share/games/{name}"
    return {
        f"{root}/music/theme.wav": tone(3.0, music_freq),
        f"{root}/music/theme.ogg": tone(3.0, music_freq * 1.5, fmt="OGG", subtype="VORBIS"),
        f"{root}/music/jingle.wav": tone(1.0),
        f"{root}/sounds/explosion.wav": tone(3.0, 90.0),
        f"{root}/music/broken.ogg": b"OggS" + bytes(200),
        f"{root}/music/tune.xm": XM,
        f"{root}/textures/tile.png": b"\x89PNG\r\n\x1a\n" + bytes(30),
        f"usr/share/doc/{package or name}/copyright": DEP5.encode(),
    }


def make_tar(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for path, target in (links or {}).items():
            info = tarfile.TarInfo("./" + path)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def pin_for(package: str, version: str = "1.0-1", deb: Path | None = None) -> C.Pin:
    size, sha = (deb.stat().st_size, C.file_sha256(deb)) if deb else (1, "0" * 64)
    return C.Pin(package, version, "all", size, sha, f"pool/main/x/{package}/{package}_{version}_all.deb")


# ------------------------------------------------------------------------------ the lock
def test_lock_round_trips_and_names_the_bad_line():
    pins = [C.Pin("a-data", "2:1.0-1", "all", 10, "a" * 64, "pool/main/a/a/a-data_1.0-1_all.deb"),
            C.Pin("b-music", "0.1+ds-2", "all", 123456, "b" * 64, "pool/main/b/b/b-music_0.1+ds-2_all.deb")]
    assert C.parse_lock(C.format_lock(pins)) == pins
    assert pins[0].deb_name == "a-data_2%3a1.0-1_all.deb" and pins[0].spec == "a-data=2:1.0-1"
    good = "a 1 all 10 " + "a" * 64 + " pool/a.deb\n"
    for text, words in [("a 1 all 10\n", "line 1: expected 6 fields"),
                        ("# c\na 1 all ten " + "a" * 64 + " p\n", "line 2: size 'ten'"),
                        ("a 1 all 10 xyz p\n", "sha256 'xyz'"),
                        (good + good, "line 2: package a is listed twice"),
                        ("# nothing\n\n", "pins no package")]:
        with pytest.raises(C.CorpusError, match=words):
            C.parse_lock(text, source="t.lock")


def test_the_repository_lock_pins_exactly_the_issue_packages():
    pins = C.read_lock(REPO / "scripts" / "real_corpus.lock")
    assert [p.package for p in pins] == ISSUE_PACKAGES
    assert all(p.architecture == "all" and p.size > 0 for p in pins)
    assert C.DEFAULT_LOCK == REPO / "scripts" / "real_corpus.lock"
    assert "/data/real-corpus/" in (REPO / ".gitignore").read_text().splitlines()


# ------------------------------------------------------------------------------ filters
@pytest.mark.parametrize("package, source, verdict", [
    ("g", "usr/share/games/g/textures/tile.png", None),
    ("g", "usr/share/games/g/music/theme.ogg", "candidate"),
    ("g", "usr/share/games/g/Music/Theme.OGG", "candidate"),
    ("g", "usr/share/g/themes/aztec.ogg", "candidate"),
    ("g", "usr/share/games/g/Data/Sounds/voices/Pirate/Hello.ogg", "sound_effect_path"),
    ("g", "usr/share/games/g/data/sfx/engine.ogg", "sound_effect_path"),
    ("g", "usr/share/games/g/tracks/intro/nolok_speech.ogg", "sound_effect_path"),
    ("g", "usr/share/games/g/sound_effects/boom.wav", "sound_effect_path"),
    ("g", "usr/share/games/g/music/tune.xm", "candidate"),  # read, then left out if it does not decode
    ("freeorion-data", "usr/share/games/freeorion/default/data/sound/artificial_intelligence_v3.ogg", "candidate"),
    ("freeorion-data", "usr/share/games/freeorion/default/data/sound/alert.ogg", "sound_effect_path"),
    ("supertuxkart-data", "usr/share/games/supertuxkart/data/tracks/black_forest/steamLocomotive.ogg",
     "package_rule"),
])
def test_path_verdict(package, source, verdict):
    got = C.path_verdict(package, source)
    assert (got if got is None else got[0]) == verdict


def test_corpus_path_is_below_the_package_folder():
    assert C.corpus_path("g", "usr/share/games/g/music/a.ogg") == "g/g/music/a.ogg"
    assert C.corpus_path("d", "usr/share/scummvm/d/audio/t1.ogg") == "d/scummvm/d/audio/t1.ogg"
    with pytest.raises(C.CorpusError, match="outside its folder"):
        C.corpus_path("g", "usr/share/games/../../../etc/x.ogg")


def test_tracker_modules_are_not_read_by_the_decoder():
    """Why MODULE_EXTENSIONS are dropped: neither decoder has a module reader."""
    import av

    from deepcontent.audio.features import AudioError, decode_mono

    assert not {"MOD", "XM", "IT", "S3M"} & set(sf.available_formats())
    assert not {"libopenmpt", "libmodplug"} & set(av.formats_available)
    with pytest.raises(AudioError):
        decode_mono(XM, max_seconds=60)


def test_copyright_licences_per_path():
    cr = C.parse_copyright(DEP5)
    assert cr.dep5 and cr.licenses() == ["GPL-2+", "CC-BY-SA-3.0"]
    # data/music/* matches the installed music (the data folder renamed), debian/* never does
    assert C.track_license(cr, "usr/share/games/game2/music/forest/a.ogg") == "CC-BY-SA-3.0"
    assert C.track_license(cr, "usr/share/games/game/data/music/a.ogg") == "CC-BY-SA-3.0"
    assert C.track_license(cr, "usr/share/games/game/levels/a.ogg") == "GPL-2+"
    engine = DEP5 + "\nFiles: hedgewars/*\nCopyright: x\nLicense: Engine-License\n"
    assert C.track_license(C.parse_copyright(engine), "usr/share/games/hedgewars/Data/Music/a.ogg") == "GPL-2+"
    free = C.parse_copyright("This package was debianized by someone.\n\nYou are free to distribute this "
                             "software under the terms of\nthe GNU General Public License, version 2 or later.\n")
    assert not free.dep5 and free.mentions == ("GPL-2+",)
    assert C.track_license(free, "usr/share/x/a.ogg") == "GPL-2+"


def test_scan_keeps_music_only_and_accounts_for_every_audio_member(tmp_path):
    files = package_files("game")
    data = make_tar(files, links={"usr/share/games/game/music/de/theme.wav": "../theme.wav"})
    pin = pin_for("game")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        rec = C.scan_tar(tar, pin, out=tmp_path, params=PARAMS)
    rows = {r["source"].rsplit("/", 2)[-2] + "/" + r["source"].rsplit("/", 1)[-1]: r for r in rec["members"]}
    assert {k: (r["status"], r.get("reason")) for k, r in rows.items()} == {
        "music/theme.wav": ("candidate", None),
        "music/theme.ogg": ("candidate", None),
        "music/jingle.wav": ("dropped", "too_short"),
        "sounds/explosion.wav": ("dropped", "sound_effect_path"),
        "music/broken.ogg": ("dropped", "undecodable"),
        "music/tune.xm": ("dropped", "tracker_module"),
        "de/theme.wav": ("dropped", "link"),
    }
    wav = rows["music/theme.wav"]
    assert wav["path"] == "game/game/music/theme.wav"
    assert wav["sha256"] == hashlib.sha256(files["usr/share/games/game/music/theme.wav"]).hexdigest()
    assert wav["duration_s"] == pytest.approx(3.0) and wav["codec"] == "wav/pcm_16"
    assert (wav["sample_rate"], wav["channels"]) == (SR, 1)
    assert rows["music/theme.ogg"]["codec"] == "ogg/vorbis"
    assert rec["other_members"] == 1 and rec["copyright"]["licenses"] == ["GPL-2+", "CC-BY-SA-3.0"]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["game/copyright.txt", "game/game/music/theme.ogg", "game/game/music/theme.wav"]
    assert (tmp_path / "game/copyright.txt").read_text() == DEP5

    limited = tmp_path / "limited"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        rec = C.scan_tar(tar, pin, out=limited, params=C.BuildParams(min_seconds=MIN_S, max_files=1))
    # past the limit nothing more is read: the rest are over_limit, whatever they hold
    assert [(r["source"].rsplit("/", 1)[-1], r.get("reason")) for r in rec["members"]] == [
        ("theme.wav", None), ("theme.ogg", "over_limit"), ("jingle.wav", "over_limit"),
        ("explosion.wav", "sound_effect_path"), ("broken.ogg", "over_limit"), ("tune.xm", "over_limit"),
        ("theme.wav", "link")]


def test_duplicates_keep_the_first_by_package_order():
    def rec(pkg, *rows):
        return {"package": pkg, "version": "1", "members": [
            {"source": s, "path": f"{pkg}/{s}", "status": "candidate", "sha256": h, "bytes": 1} for s, h in rows]}

    kept, dropped = C.select_tracks([rec("a", ("x.ogg", "1"), ("y.ogg", "2"), ("y2.ogg", "2")),
                                     rec("b", ("z.ogg", "1"), ("w.ogg", "3"))])
    assert [r["path"] for r in kept] == ["a/x.ogg", "a/y.ogg", "b/w.ogg"]
    assert [(r["path"], r["reason"], r["detail"]) for r in dropped] == [
        ("a/y2.ogg", "duplicate", "same bytes as a/y.ogg"), ("b/z.ogg", "duplicate", "same bytes as a/x.ogg")]


# ------------------------------------------------------------------ builds on fake packages
needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed (not Debian)")

FAKE_APT_GET = r"""#!/bin/sh
# a stand-in for `apt-get download PKG=VERSION`: copies $FAKE_DEBS/PKG_VERSION_all.deb here
for spec; do :; done
pkg=${spec%%=*}; ver=${spec#*=}
echo "apt-get $*" >> "$FAKE_DEBS/apt.log"
if [ "${FAKE_APT_MODE:-}" = offline ]; then
  echo "Err:1 http://deb.debian.org/debian bookworm/main amd64 $pkg all $ver" >&2
  echo "  Temporary failure resolving 'deb.debian.org'" >&2
  echo "E: Failed to fetch http://deb.debian.org/debian/pool/main/$pkg.deb  Temporary failure resolving 'deb.debian.org'" >&2
  exit 100
fi
if [ -f "$FAKE_DEBS/${pkg}_${ver}_all.deb" ]; then cp "$FAKE_DEBS/${pkg}_${ver}_all.deb" .; exit 0; fi
echo "E: Version '$ver' for '$pkg' was not found" >&2
exit 100
"""
FAKE_APT_CACHE = r"""#!/bin/sh
# a stand-in for `apt-cache policy PKG` and `apt-cache show --no-all-versions PKG`
for pkg; do :; done
if [ "$1" = show ]; then
  printf 'Package: %s\nVersion: 9.9-1\nArchitecture: all\nSize: 1234\nSHA256: %s\nFilename: pool/main/x/%s_9.9-1_all.deb\n\n' \
    "$pkg" eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee "$pkg"
  exit 0
fi
printf '%s:\n  Installed: (none)\n  Candidate: 9.9-1\n  Version table:\n     9.9-1 500\n        500 http://deb.debian.org/debian bookworm/main amd64 Packages\n' "$pkg"
"""


def make_deb(tmp: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    root = tmp / f"root-{package}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
                                         f"Maintainer: Test <t@example.org>\nDescription: test data\n")
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    deb = tmp / "debs" / f"{package}_{version}_all.deb"
    deb.parent.mkdir(exist_ok=True)
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", "-Zgzip", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


@pytest.fixture
def fake_archive(tmp_path, monkeypatch):
    """Two packages in a fake archive whose apt-get / apt-cache are first on the PATH; the
    second package repeats the first one's theme.wav byte for byte."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed (not Debian)")
    a = package_files("game", "game-data")
    b = package_files("other", "other-music", music_freq=330.0)
    b["usr/share/games/other/music/copy.wav"] = a["usr/share/games/game/music/theme.wav"]
    pins = [pin_for("game-data", "1.0-1", make_deb(tmp_path, "game-data", "1.0-1", a)),
            pin_for("other-music", "2:0.5-2", make_deb(tmp_path, "other-music", "2:0.5-2", b))]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("apt-get", FAKE_APT_GET), ("apt-cache", FAKE_APT_CACHE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEBS", str(tmp_path / "debs"))
    lock = tmp_path / "real_corpus.lock"
    lock.write_text(C.format_lock(pins))
    return {"pins": pins, "lock": lock, "out": tmp_path / "corpus", "cache": tmp_path / "cache",
            "log": tmp_path / "debs" / "apt.log"}


def _files(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


def _build(fa, pins=None, **kw):
    return C.build(pins or fa["pins"], out=fa["out"], cache=fa["cache"], params=PARAMS,
                   all_packages=[p.package for p in fa["pins"]], log=lambda m: None, **kw)


def test_build_is_idempotent_and_dedups_over_packages(fake_archive):
    fa = fake_archive
    first = _build(fa, jobs=2)
    assert first.downloaded == ["game-data", "other-music"] and first.scanned == ["game-data", "other-music"]
    out = fa["out"]
    with open(out / "tracks.csv") as f:
        tracks = list(csv.DictReader(f))
    assert sorted((t["path"], t["package"], t["license"]) for t in tracks) == [
        ("game-data/game/music/theme.ogg", "game-data", "CC-BY-SA-3.0"),
        ("game-data/game/music/theme.wav", "game-data", "CC-BY-SA-3.0"),
        ("other-music/other/music/theme.ogg", "other-music", "CC-BY-SA-3.0"),
        ("other-music/other/music/theme.wav", "other-music", "CC-BY-SA-3.0")]
    assert {t["license_file"] for t in tracks} == {"game-data/copyright.txt", "other-music/copyright.txt"}
    for t in tracks:
        assert C.file_sha256(out / t["path"]) == t["sha256"] and int(t["bytes"]) == (out / t["path"]).stat().st_size
    with open(out / "dropped.csv") as f:
        dropped = {(d["package"], d["source"].rsplit("/", 1)[-1]): d for d in csv.DictReader(f)}
    assert dropped[("other-music", "copy.wav")]["reason"] == "duplicate"
    assert dropped[("other-music", "copy.wav")]["detail"] == "same bytes as game-data/game/music/theme.wav"
    assert {d["reason"] for d in dropped.values()} == {"duplicate", "too_short", "sound_effect_path", "undecodable",
                                                       "tracker_module"}
    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["totals"]["tracks"] == 4 and manifest["totals"]["dropped"]["duplicate"] == 1
    assert [p["deb_sha256"] for p in manifest["packages"]] == [p.sha256 for p in fa["pins"]]
    assert not (out / "other-music/other/music/copy.wav").exists()
    summary = C.format_summary(first)
    assert "game-data" in summary and "CC-BY-SA-3.0" in summary and "Not decodable:" in summary

    before = _files(out)
    apt_calls = fa["log"].read_text()
    second = _build(fa)
    assert (second.downloaded, second.scanned, second.reused) == ([], [], ["game-data", "other-music"])
    assert _files(out) == before  # nothing rewritten
    assert fa["log"].read_text() == apt_calls  # apt not even asked
    assert C.format_summary(second) == summary

    # a lost track is re-extracted from the cached .deb, nothing is scanned again
    (out / "other-music/other/music/theme.ogg").unlink()
    (out / "stray.txt").write_text("mine")
    third = _build(fa)
    assert (third.scanned, third.repaired) == ([], 1)
    assert set(_files(out)) == set(before) | {"stray.txt"}  # a file that is not the builder's is left alone

    # a slice: the folder holds exactly the selection; the duplicate is now the kept copy
    fourth = _build(fa, pins=fa["pins"][1:])
    assert fourth.scanned == [] and not (out / "game-data").exists()
    assert (out / "other-music/other/music/copy.wav").is_file()


def test_the_corpus_is_a_folder_catalog_and_a_transfer_folder(fake_archive):
    from deepcontent.config import IngestConfig
    from deepcontent.evaluate.target_folder import layout
    from deepcontent.interactions.tables import folder_tracks

    out = fake_archive["out"]
    _build(fake_archive)
    keys = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    lay = layout(keys, non_audio_extensions=IngestConfig().non_audio_extensions)
    with open(out / "tracks.csv") as f:
        tracks = [t["path"] for t in csv.DictReader(f)]
    assert lay.keys == sorted(tracks)  # every track, labelled by its package; nothing else
    assert set(lay.labels) == {"game-data", "other-music"}
    assert all(v.startswith("not_audio") for v in lay.left_out.values())  # csv, json, copyright.txt
    assert set(lay.left_out) == set(keys) - set(tracks)
    table = folder_tracks(tracks, tracks)
    assert table["artist"].to_pylist() == [t.split("/", 1)[0] for t in tracks]


def test_a_gone_pin_fails_naming_the_package_the_archive_and_the_fix(fake_archive, capsys):
    fa = fake_archive
    gone = C.Pin("game-data", "0.9-1", "all", 10, "c" * 64, "pool/main/g/game/game-data_0.9-1_all.deb")
    with pytest.raises(C.PinUnavailable) as err:
        _build(fa, pins=[gone])
    msg = str(err.value)
    for words in ("game-data=0.9-1", "Version '0.9-1' for 'game-data' was not found", "Candidate: 9.9-1",
                  "apt-get update", "--update-lock", "snapshot.debian.org"):
        assert words in msg
    # the same through the command line: exit status 2, the message on stderr, no traceback
    fa["lock"].write_text(C.format_lock([gone]))
    assert C.main(["--lock", str(fa["lock"]), "--out", str(fa["out"]), "--cache", str(fa["cache"])]) == 2
    stderr = capsys.readouterr().err
    assert "build_real_corpus: error: pinned package game-data=0.9-1" in stderr and "Traceback" not in stderr


def test_an_unreachable_archive_and_foreign_bytes_are_named(fake_archive, monkeypatch):
    fa = fake_archive
    monkeypatch.setenv("FAKE_APT_MODE", "offline")
    with pytest.raises(C.ArchiveUnreachable, match="Temporary failure resolving"):
        _build(fa)
    monkeypatch.delenv("FAKE_APT_MODE")
    wrong = [C.Pin(p.package, p.version, "all", p.size, "d" * 64, p.filename) for p in fa["pins"]]
    with pytest.raises(C.CorpusError, match=r"game-data=1.0-1: the archive's .deb has \d+ bytes and sha256"):
        _build(fa, pins=wrong)
    assert not list(fa["cache"].glob("*.deb"))  # foreign bytes are not kept


def test_command_line_slice_and_summary(fake_archive, capsys):
    fa = fake_archive
    args = ["--lock", str(fa["lock"]), "--out", str(fa["out"]), "--cache", str(fa["cache"]), "--min-seconds", "2"]
    assert C.main(args + ["--packages", "other-music", "--max-files", "1", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "other-music" in out and "1 tracks from 1 of 1 packages" in out and "limit" in out
    assert C.main(args + ["--packages", "nope"]) == 2
    assert "--packages nope: not in" in capsys.readouterr().err


# -------------------------------------------------------------------- the real archive
def test_tiny_real_slice_from_the_debian_archive(tmp_path):
    """asc-music (10 MB, three MP3s; one kept with --max-files 1) and fb-music-high (1.4 MB, one
    tracker module, which the decoder does not read) from the pinned Debian archive."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed: the real-audio corpus needs a Debian machine")
    pins = [p for p in C.read_lock(REPO / "scripts" / "real_corpus.lock")
            if p.package in ("asc-music", "fb-music-high")]
    params = C.BuildParams(max_files=1)
    try:
        res = C.build(pins, out=tmp_path / "corpus", cache=tmp_path / "cache", params=params, log=lambda m: None)
    except C.ArchiveUnreachable as exc:
        pytest.skip(f"the Debian archive cannot be reached from here: {exc}")
    except C.PinUnavailable as exc:
        pytest.skip(f"this machine's apt sources no longer offer a pinned version (see README, 'A real-audio "
                    f"corpus', to re-pin): {str(exc).splitlines()[0]}")
    assert [r["path"] for r in res.kept] == ["asc-music/asc/music/frontiers.mp3"]
    track = res.kept[0]
    assert track["codec"] == "mp3/mpeg_layer_iii" and track["duration_s"] > 400 and track["license"] == "GPL-2+"
    assert {(r["package"], r["reason"]) for r in res.dropped} == {("asc-music", "over_limit"),
                                                                  ("fb-music-high", "tracker_module")}
    assert (tmp_path / "corpus/asc-music/copyright.txt").read_text().startswith("Format:")
    assert not (tmp_path / "corpus/fb-music-high").exists()
    again = C.build(pins, out=tmp_path / "corpus", cache=tmp_path / "cache", params=params, log=lambda m: None)
    assert (again.downloaded, again.scanned) == ([], []) and C.format_summary(again) == C.format_summary(res)


def test_update_lock_repins_to_what_apt_offers(fake_archive, capsys):
    lock = fake_archive["lock"]
    assert C.main(["--lock", str(lock), "--update-lock"]) == 0
    assert "game-data: 1.0-1" in capsys.readouterr().out
    pins = C.read_lock(lock)
    assert [(p.package, p.version, p.size, p.sha256) for p in pins] == [
        ("game-data", "9.9-1", 1234, "e" * 64), ("other-music", "9.9-1", 1234, "e" * 64)]
    assert C.update_lock(lock) == []  # nothing changes a second time


def test_a_package_split_keeps_packages_whole_and_is_stable(tmp_path):
    from deepcontent.corpus import split_corpus, split_packages

    names = [f"pkg{i}" for i in range(10)]
    pre, held = split_packages(names, fraction=0.7, seed=0)
    assert len(pre) == 7 and len(held) == 3 and not set(pre) & set(held) and set(pre) | set(held) == set(names)
    assert split_packages(reversed(names), fraction=0.7, seed=0) == (pre, held)  # order-free
    assert split_packages(names, fraction=0.7, seed=1) != (pre, held)
    corpus = tmp_path / "corpus"
    rows = []
    for p in ("a", "b", "c"):
        (corpus / p).mkdir(parents=True)
        for k in range(2):
            (corpus / p / f"t{k}.ogg").write_bytes(f"{p}{k}".encode())
            rows.append(f"{p}/t{k}.ogg,{p}")
    (corpus / "tracks.csv").write_text("path,package\n" + "\n".join(rows) + "\n")
    info = split_corpus(corpus, tmp_path / "split", fraction=0.6, seed=0)
    assert info["tracks"] == {"pretrain": 4, "heldout": 2} and len(info["heldout"]) == 1
    held_pkg = info["heldout"][0]
    assert (tmp_path / "split" / "heldout" / held_pkg / "t0.ogg").read_bytes() == f"{held_pkg}0".encode()
    assert not (tmp_path / "split" / "pretrain" / held_pkg).exists()
    assert split_corpus(corpus, tmp_path / "split", fraction=0.6, seed=0) == info  # idempotent
