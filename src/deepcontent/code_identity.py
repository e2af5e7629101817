"""Which deepcontent code a process runs, and whether it is the code that was submitted.

``deepcontent submit`` of a Ray stage (and the nightly's Ray stages) ships the package it was
built from with the job (Ray's ``py_modules``: the uploaded copy comes first on the job's
``PYTHONPATH``, ahead of whatever deepcontent the cluster's image has installed) and names that
code's fingerprint in the job's environment (:data:`ENV`). The job's entry point checks, before
it does anything, that the package it imported has that fingerprint; a job that would run other
code than was submitted fails at once, naming both, instead of silently running the image's.

The fingerprint is a SHA-256 over the package's Python sources (relative path and bytes of
every ``*.py``), so it is the same wherever the same code lies.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from deepcontent.errors import SubmitError

__all__ = ["ENV", "check_submitted_code", "fingerprint", "package_dir"]

#: The environment variable naming the fingerprint of the submitted code.
ENV = "DEEPCONTENT_SUBMITTED_CODE"


def package_dir() -> Path:
    """The folder of the deepcontent package this process imported."""
    return Path(__file__).resolve().parent


def fingerprint(package: str | os.PathLike | None = None) -> str:
    """16 hex digits of SHA-256 over the ``*.py`` files under ``package`` (default: this
    process's deepcontent), by relative path, ``__pycache__`` left out."""
    root = Path(package) if package is not None else package_dir()
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def check_submitted_code(environ: dict[str, str] | None = None) -> str | None:
    """Compare this process's deepcontent with the code named by :data:`ENV`.

    Returns
    -------
    str or None
        None when no code was named (not a submitted job); else one line naming the code and
        where it was imported from, for the job's log.

    Raises
    ------
    SubmitError
        The imported package is not the submitted code.
    """
    expected = (os.environ if environ is None else environ).get(ENV)
    if not expected:
        return None
    actual = fingerprint()
    if actual != expected:
        raise SubmitError(f"this job imports deepcontent from {package_dir()} (code {actual}), not the code that was "
                          f"submitted (code {expected}): the job's py_modules did not come first on its path")
    return f"running the submitted deepcontent code {actual} from {package_dir()}"
