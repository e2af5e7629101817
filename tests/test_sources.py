"""Parsers of the published formats, on hand-written inputs with known answers."""

import json
import sqlite3

import pyarrow as pa

from deepcontent.interactions.sources import (
    parse_lastfm_json,
    parse_mismatches,
    parse_triplets,
    parse_unique_tracks,
    read_lastfm_db,
)

U1, U2 = "b80344d063b5ccb3212f76538f3d9e43d87dca9e", "85c1f87fea955d09b4bec2e36aee110927aedf9a"


def test_triplets_good_and_bad_lines_with_exact_locators():
    lines = [
        f"{U1}\tSOAKIMP12A8C130995\t1",  # good
        f"{U1}\tSOAPDEY12A81C210A9\t2\textra",  # too many fields
        "",  # blank line
        f"{U2}\tSOAKIMP12A8C130995\tseven",  # not a number
        f"{U2}\tSOAPDEY12A81C210A9\t0",  # not positive
        f"{U2}\tSOBBMDR12A8C13253B\t-4",  # not positive
        f"{U2}\tSOUNKNOWN000000000\t3",  # unknown song
        f"{U2}\tSOAPDEY12A81C210A9\t3000000000",  # beyond int32
        f"{U2}\tSOBBMDR12A8C13253B\t5",  # good
    ]
    data = ("\n".join(lines) + "\n").encode()
    known = pa.array(["SOAKIMP12A8C130995", "SOAPDEY12A81C210A9", "SOBBMDR12A8C13253B"])
    plays, q = parse_triplets(data, uri="s3://raw/t.txt", base_offset=1000, known_songs=known)
    assert plays.to_pylist() == [
        {"user_id": U1, "song_id": "SOAKIMP12A8C130995", "play_count": 1},
        {"user_id": U2, "song_id": "SOBBMDR12A8C13253B", "play_count": 5},
    ]
    assert plays.schema.field("play_count").type == pa.int32()
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()) + 1)
    got = {(r["source"], r["reason"]) for r in q.to_pylist()}
    expected = {
        (f"s3://raw/t.txt@{1000 + offsets[1]}", "malformed_line"),
        (f"s3://raw/t.txt@{1000 + offsets[2]}", "malformed_line"),
        (f"s3://raw/t.txt@{1000 + offsets[3]}", "bad_count"),
        (f"s3://raw/t.txt@{1000 + offsets[4]}", "nonpositive_count"),
        (f"s3://raw/t.txt@{1000 + offsets[5]}", "nonpositive_count"),
        (f"s3://raw/t.txt@{1000 + offsets[6]}", "unknown_song"),
        (f"s3://raw/t.txt@{1000 + offsets[7]}", "bad_count"),
    }
    assert got == expected
    assert plays.num_rows + q.num_rows == len(lines)  # nothing lost
    assert any("seven" in d for d in q["detail"].to_pylist())


def test_triplets_tolerate_crlf_and_a_missing_final_newline():
    data = f"{U1}\tSOA\t3\r\n{U2}\tSOB\t4".encode()
    plays, q = parse_triplets(data, uri="u")
    assert plays["play_count"].to_pylist() == [3, 4] and q.num_rows == 0


def test_triplets_invalid_utf8_is_quarantined_not_crashed():
    data = b"\xff\xfe\tSOA\t3\n" + f"{U1}\tSOA\t2\n".encode()
    plays, q = parse_triplets(data, uri="u")
    assert plays.num_rows == 1 and q["reason"].to_pylist() == ["malformed_line"]


def test_unique_tracks_keeps_separators_inside_titles_out():
    data = ("TRMMMYQ128F932D901<SEP>SOQMMHC12AB0180CB8<SEP>Faster Pussy cat<SEP>Silent Night\n"
            "TRMMMKD128F425225D<SEP>SOVFVAK12A8C1350D9<SEP>Karkkiautomaatti<SEP>Tanssi vaan\n"
            "TRBROKEN<SEP>only three<SEP>fields\n").encode()
    tracks, q = parse_unique_tracks(data, uri="s3://raw/unique_tracks.txt")
    assert tracks["track_id"].to_pylist() == ["TRMMMYQ128F932D901", "TRMMMKD128F425225D"]
    assert tracks["title"].to_pylist() == ["Silent Night", "Tanssi vaan"]
    assert q.to_pylist()[0]["reason"] == "malformed_line"
    assert q.to_pylist()[0]["source"] == f"s3://raw/unique_tracks.txt@{len(data.split(b'TRBROKEN')[0])}"


def test_mismatch_list_yields_song_track_pairs():
    data = (b"ERROR: <SOUMNSI12AB0182807 TRMMGKQ128F9325E10> Digital Underground  -  The Way We Swing  !=  "
            b"Linkwood  -  Whats up with the Underground\n"
            b"ERROR: <SOCMRBE12AB018C546 TRMMREB12903CEB1B1> Jimmy Reed  -  The Sun Is Shining (Digitally Remastered)  !=  "
            b"Slim Harpo  -  I Got Love If You Want It\n")
    pairs = parse_mismatches(data)
    assert pairs.to_pylist() == [
        {"song_id": "SOUMNSI12AB0182807", "track_id": "TRMMGKQ128F9325E10"},
        {"song_id": "SOCMRBE12AB018C546", "track_id": "TRMMREB12903CEB1B1"},
    ]


def test_lastfm_json_good_bad_weight_and_broken_file():
    doc = {"artist": "A", "timestamp": "2011-08-15 18:00:00.1", "similars": [["TRX", 1.0]],
           "tags": [["rock", "100"], ["90s", "37"], ["weird", "140"], ["nan", "NaN"], ["bad"]],
           "track_id": "TRAAAAW128F429D538", "title": "T"}
    tags, q = parse_lastfm_json(json.dumps(doc).encode(), uri="s3://raw/A/A/A/TRAAAAW128F429D538.json")
    assert tags.to_pylist() == [
        {"track_id": "TRAAAAW128F429D538", "tag": "rock", "weight": 100},
        {"track_id": "TRAAAAW128F429D538", "tag": "90s", "weight": 37},
    ]
    assert q["reason"].to_pylist() == ["bad_weight", "bad_weight", "bad_weight"]
    assert q["source"].to_pylist()[0].endswith("#tags[2]")
    tags, q = parse_lastfm_json(b"{not json", uri="s3://raw/broken.json")
    assert tags.num_rows == 0 and q.to_pylist()[0]["reason"] == "malformed_json"


def test_lastfm_sqlite_database(tmp_path):
    path = tmp_path / "lastfm_tags.db"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE tids (tid TEXT); CREATE TABLE tags (tag TEXT); CREATE TABLE tid_tag (tid INT, tag INT, val FLOAT);
        INSERT INTO tids VALUES ('TRAAAAK128F9318786'), ('TRAAAAV128F421A322');
        INSERT INTO tags VALUES ('rock'), ('alternative');
        INSERT INTO tid_tag VALUES (1, 1, 100.0), (1, 2, 12.0), (2, 2, 250.0);
    """)
    con.commit()
    con.close()
    tags, q = read_lastfm_db(str(path), uri="s3://raw/lastfm_tags.db")
    assert sorted(tags.to_pylist(), key=lambda r: r["tag"]) == [
        {"track_id": "TRAAAAK128F9318786", "tag": "alternative", "weight": 12},
        {"track_id": "TRAAAAK128F9318786", "tag": "rock", "weight": 100},
    ]
    assert q["reason"].to_pylist() == ["bad_weight"]
