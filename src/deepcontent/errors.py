"""The project's exceptions: one hierarchy, so a caller can catch everything deepcontent raises
on purpose with ``except DeepcontentError`` and still tell the kinds apart.

Every message names the bad value, file, record or dataset, and never a secret. Each class also
derives from the built-in exception a Python user would expect (``ValueError`` for bad values,
``FileNotFoundError`` for a missing input, ``RuntimeError`` for a failed operation), so code
written against those keeps working.

::

    DeepcontentError
    ├── ConfigError              a config file, override or value is invalid
    ├── InputMissingError        a stage's input was never published (names the stage to run)
    ├── QuarantineExceeded       too large a share of a run's input was quarantined
    ├── StorageError             an object-store operation failed (names the URI)
    │   ├── UnsafeKeyError       a key would escape its root
    │   ├── PublishConflict      another run published the dataset since this run read it
    │   └── CorruptFileError     a stored file does not read (names it and the repair)
    ├── WarehouseError           an Iceberg catalog or table operation failed
    │   └── WarehouseSchemaError incoming data does not fit a table's schema
    ├── TrainingDataError        the inputs cannot make a training set
    ├── StageError               a stage ran and failed (wraps the cause, names the run)
    └── SubmitError              a cluster submission cannot be built

Domain errors raised by the pure packages (``AudioError``, ``FactorizationError``) derive from
:class:`DeepcontentError` too; they live next to the code that raises them.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CorruptFileError",
    "DeepcontentError",
    "InputMissingError",
    "PublishConflict",
    "QuarantineExceeded",
    "StageError",
    "StorageError",
    "SubmitError",
    "TrainingDataError",
    "UnsafeKeyError",
    "WarehouseError",
    "WarehouseSchemaError",
]


class DeepcontentError(Exception):
    """Base of every exception deepcontent raises on purpose."""


class ConfigError(DeepcontentError, ValueError):
    """A configuration file, override or value is invalid; the message names which."""


class InputMissingError(DeepcontentError, FileNotFoundError):
    """A stage needs a dataset, model or file that does not exist yet; the message names it and
    the command that produces it."""


class QuarantineExceeded(DeepcontentError, RuntimeError):
    """More than the configured share of a run's input was quarantined. Nothing but the
    quarantine was published; the message gives the counts per reason and where they are."""


class StorageError(DeepcontentError, RuntimeError):
    """An object-store operation failed; the message names the URI."""


class UnsafeKeyError(DeepcontentError, ValueError):
    """A key would escape its root (``..``, absolute path, NUL byte, backslash)."""


class CorruptFileError(StorageError):
    """A stored file exists but does not read (a truncated or overwritten Parquet part). The
    message names the file and the repair: ``deepcontent rollback <dataset>`` returns the
    dataset to its last readable version, and the owning stage's next run rebuilds the rest."""

    def __init__(self, uri: str, detail: str) -> None:
        self.uri = uri
        dataset = uri.split("/data/", 1)[0] if "/data/" in uri else None
        hint = (f"; repair: `deepcontent rollback {dataset}` returns the dataset to its last readable version"
                if dataset else "")
        super().__init__(f"corrupt or unreadable file {uri}: {detail}{hint}")


class PublishConflict(StorageError):
    """Another run published a dataset after this run read the version it builds on: this
    run's version was not published (its staged files stay until swept) and a re-run builds on
    the winner's output. The message names the dataset and both generations."""


class WarehouseError(DeepcontentError, RuntimeError):
    """A warehouse operation failed; the message names the table (secrets redacted)."""


class WarehouseSchemaError(WarehouseError, ValueError):
    """Incoming data does not fit a table's schema; the message names the table and column."""


class TrainingDataError(DeepcontentError, ValueError):
    """The inputs cannot make a training set; the message names what is missing and where."""


class StageError(DeepcontentError, RuntimeError):
    """A stage started and failed; the message names the run, its manifest and the cause."""


class SubmitError(DeepcontentError):
    """A submission that cannot be built (bad stage, missing file, a secret in the way); the
    message names the bad value. ``code`` is the exit status."""

    def __init__(self, message: str, *, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
