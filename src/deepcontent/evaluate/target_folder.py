"""A GTZAN-layout folder as labelled, grouped clips (pure: keys in, lists out).

The layout is ``<label>/<clip>`` (GTZAN: ``blues/blues.00000.wav``): the first folder level is
the class. A grouping per clip (artist, album, source) comes from one of

- a groups file (:func:`parse_groups_csv`): CSV rows ``path,group`` with ``path`` relative to
  the folder (``blues/blues.00000.wav``), an optional header (``path,group``; ``clip``/``file``
  and ``artist``/``album``/``source`` are accepted as the column names);
- a folder level (:func:`layout`, ``group_level=2``): ``<label>/<group>/<clip>``, the second
  level names the group.

Every object found is accounted for: a clip is kept or left out with its reason
(:data:`REASONS`), so ``kept + left out = found``.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["GROUPS_FILE", "REASONS", "FolderLayout", "layout", "normalise_key", "parse_groups_csv"]

#: The name of a folder's own groups file (read when present and no other grouping is given).
GROUPS_FILE = "groups.csv"

#: Why a clip of the folder is left out before decoding (decoding adds its own reasons:
#: ``undecodable``, ``empty``, ``too_long``, ``too_short``, ``silent``, ``timeout``, ...).
REASONS = {
    "not_audio": "its extension is never audio (cover art, text, playlists)",
    "no_label": "it lies at the top of the folder, not in a <label>/ folder",
    "no_group": "the grouping gives it no group (not in the groups file, or not deep enough for the group level)",
}

_PATH_COLUMNS = ("path", "clip", "file", "filename")
_GROUP_COLUMNS = ("group", "artist", "album", "source")


def normalise_key(path: str) -> str:
    """``./blues\\\\a.wav`` -> ``blues/a.wav``: forward slashes, no leading ``./`` or ``/``."""
    key = posixpath.normpath(str(path).strip().replace("\\", "/")).lstrip("/")
    return "" if key == "." else key


def parse_groups_csv(text: str, *, source: str) -> dict[str, str]:
    """``{clip key: group}`` from a groups CSV.

    Parameters
    ----------
    text : str
        CSV (comma-separated, optionally quoted): rows ``path,group``; a first row naming its
        columns (``path``/``clip``/``file`` and ``group``/``artist``/``album``/``source``, any
        order, other columns ignored) is a header. Blank lines are skipped.
    source : str
        Where the text came from, for error messages.

    Raises
    ------
    ValueError
        Naming ``source`` and the line: a row without both fields, an empty field, or a clip
        given two different groups.
    """
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise ValueError(f"groups file {source} is empty")
    header = [c.strip().lower() for c in rows[0]]
    path_col, group_col, first = 0, 1, 0
    if any(c in _PATH_COLUMNS for c in header) and any(c in _GROUP_COLUMNS for c in header):
        path_col = next(i for i, c in enumerate(header) if c in _PATH_COLUMNS)
        group_col = next(i for i, c in enumerate(header) if c in _GROUP_COLUMNS)
        first = 1
    out: dict[str, str] = {}
    for line, row in enumerate(rows[first:], start=first + 1):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(path_col, group_col):
            raise ValueError(f"groups file {source} line {line}: expected a clip path and a group, got {row!r}")
        key, group = normalise_key(row[path_col]), row[group_col].strip()
        if not key or not group:
            raise ValueError(f"groups file {source} line {line}: empty clip path or group in {row!r}")
        if out.get(key, group) != group:
            raise ValueError(f"groups file {source} line {line}: clip {key!r} is in group {out[key]!r} and in "
                             f"group {group!r}")
        out[key] = group
    if not out:
        raise ValueError(f"groups file {source} has no rows")
    return out


@dataclass
class FolderLayout:
    """What :func:`layout` makes of a folder's keys.

    Attributes
    ----------
    keys, labels : list of str
        The clips kept (sorted by key) and their class.
    groups : list of str or None
        Their group, or None without a grouping.
    left_out : dict
        ``{key: "reason: detail"}`` of clips left out before decoding.
    unused_groups : int
        Entries of the groups file that name no clip of the folder.
    """

    keys: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    groups: list[str] | None = None
    left_out: dict[str, str] = field(default_factory=dict)
    unused_groups: int = 0


def layout(keys: Iterable[str], *, groups: Mapping[str, str] | None = None, group_level: int | None = None,
           non_audio_extensions: Iterable[str] = ()) -> FolderLayout:
    """Labels and groups of a folder's clips.

    Parameters
    ----------
    keys : iterable of str
        Every object below the folder, relative to it (``blues/blues.00000.wav``); the folder's
        groups file is not one of them.
    groups : mapping or None
        ``{key: group}`` (:func:`parse_groups_csv`).
    group_level : int >= 2 or None
        The folder level that names the group (2: ``<label>/<group>/<clip>``). Not with
        ``groups``.
    non_audio_extensions : iterable of str
        Lower-case extensions (``".jpg"``) left out as ``not_audio`` without being read.

    Returns
    -------
    FolderLayout
    """
    if groups is not None and group_level is not None:
        raise ValueError("give a groups file or a group level, not both")
    if group_level is not None and (isinstance(group_level, bool) or not isinstance(group_level, int)
                                    or group_level < 2):
        raise ValueError(f"group_level must be an integer >= 2 (level 1 is the label), got {group_level!r}")
    skip = {e.lower() for e in non_audio_extensions}
    out = FolderLayout(groups=[] if (groups is not None or group_level is not None) else None)
    seen: set[str] = set()
    for raw in sorted(keys):
        key = normalise_key(raw)
        seen.add(key)
        parts = key.split("/")
        ext = posixpath.splitext(parts[-1])[1].lower()
        if ext in skip:
            out.left_out[key] = f"not_audio: extension {ext} is never audio"
            continue
        if len(parts) < 2:
            out.left_out[key] = "no_label: at the top of the folder, not in a <label>/ folder"
            continue
        group = None
        if groups is not None:
            group = groups.get(key)
            if group is None:
                out.left_out[key] = "no_group: not in the groups file"
                continue
        elif group_level is not None:
            if len(parts) < group_level + 1:
                out.left_out[key] = (f"no_group: {len(parts) - 1} folder level(s), the group level is {group_level} "
                                     f"(<label>/<group>/<clip>)")
                continue
            group = parts[group_level - 1]
        out.keys.append(key)
        out.labels.append(parts[0])
        if out.groups is not None:
            out.groups.append(group)
    if groups is not None:
        out.unused_groups = sum(1 for k in groups if k not in seen)
    return out
