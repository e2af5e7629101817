"""Reading a service's own catalog inputs: table sources and the audio listing.

The ingest stage reads the catalog through here, whatever shape it arrives in
(:class:`~deepcontent.config.TableSource`):

* a CSV / TSV file, read whole on the driver (track lists, small tag tables);
* a Parquet file or a folder of Parquet files, read by Spark tasks one file each;
* an Iceberg table of the configured warehouse catalog (``iceberg:<namespace>.<table>``): its
  current snapshot's data files, read by Spark tasks like Parquet; a table with row-level
  deletes is read whole through pyiceberg instead.

Keys are under ``<storage.root>/<storage.raw_prefix>``; a full URI (any bucket the storage's
credentials can read) is taken as it is. Nothing here interprets rows: the pure parsers of
:mod:`deepcontent.interactions.tables` do.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pyarrow as pa

from deepcontent.errors import InputMissingError
from deepcontent.storage import Storage

if TYPE_CHECKING:
    from deepcontent.config import TableSource
    from deepcontent.warehouse import Warehouse

__all__ = ["ICEBERG", "SourceTable", "resolve_uri"]

ICEBERG = "iceberg:"


def resolve_uri(storage: Storage, raw_prefix: str, uri: str) -> str:
    """A full URI as given, else a key under the raw prefix."""
    return uri if "://" in uri else storage.raw_uri(raw_prefix, uri)


class SourceTable:
    """One configured table source, resolved: where it is, its format, its files.

    Parameters
    ----------
    source : TableSource
    storage : Storage
    raw_prefix : str
    warehouse : Warehouse, optional
        Needed for ``iceberg:`` sources (the table is looked up in its catalog).
    what : str
        Names the source in errors (``"sources.play_table"``).
    """

    def __init__(self, source: "TableSource", storage: Storage, *, raw_prefix: str, warehouse: "Warehouse | None" = None,
                 what: str) -> None:
        self.source, self.storage, self.what = source, storage, what
        fmt = source.format
        if source.uri.startswith(ICEBERG):
            fmt = "iceberg"
        elif fmt == "auto":
            lower = source.uri.lower().rstrip("/")
            fmt = "tsv" if lower.endswith(".tsv") else "csv" if lower.endswith(".csv") else "parquet"
        self.format = fmt
        self.uri = source.uri if fmt == "iceberg" else resolve_uri(storage, raw_prefix, source.uri)
        self._warehouse = warehouse
        self._table = None

    # ------------------------------------------------------------------ iceberg
    def _iceberg(self):
        if self._table is None:
            if self._warehouse is None:
                raise InputMissingError(f"{self.what}: {self.uri} is an Iceberg table but no warehouse was given")
            ident = self.uri[len(ICEBERG):]
            if "." not in ident:
                raise InputMissingError(f"{self.what}: {self.uri!r} must name iceberg:<namespace>.<table>")
            namespace, _, name = ident.rpartition(".")
            try:
                self._table = self._warehouse.catalog.load_table((namespace, name))
            except Exception as exc:
                raise InputMissingError(f"{self.what}: cannot load Iceberg table {ident!r}: {type(exc).__name__}: "
                                        f"{str(exc)[:200]}") from None
        return self._table

    # ------------------------------------------------------------------ what it is
    def fingerprint(self) -> list[tuple[str, str]]:
        """What identifies the source's current content: ``(uri, version)`` of each file (its
        ETag, else size and modification time), or the Iceberg table's metadata location (new
        with every commit)."""
        if self.format == "iceberg":
            return [(self.uri, self._iceberg().metadata_location)]
        return [(f, self.storage.info(f).version) for f in self.files()]

    def files(self) -> list[str]:
        """Parquet / CSV files (a single file, or every ``*.parquet`` under a folder), or the
        data files of an Iceberg table's current snapshot; ``[]`` for an Iceberg table with
        row-level deletes (read it whole with :meth:`read`).

        Raises
        ------
        InputMissingError
            When the source holds no file (the message names it).
        """
        if self.format == "iceberg":
            tasks = list(self._iceberg().scan().plan_files())
            if any(t.delete_files for t in tasks):
                return []
            return [t.file.file_path for t in tasks]
        if self.storage.exists(self.uri):
            return [self.uri]
        files = [o.uri for o in self.storage.list(self.uri) if o.uri.endswith(".parquet")]
        if not files:
            raise InputMissingError(f"{self.what}: nothing at {self.uri} (a {self.format} file or a folder of "
                                    f"Parquet files was expected)")
        return files

    def read(self, *, columns: list[str] | None = None) -> pa.Table:
        """The whole table on this machine (the driver)."""
        if self.format == "iceberg":
            return self._iceberg().scan(selected_fields=tuple(columns) if columns else ("*",)).to_arrow()
        if self.format in ("csv", "tsv"):
            return read_delimited(self.storage.read_bytes(self.files()[0]), delimiter="\t" if self.format == "tsv" else ",")
        return self.storage.read_parquet(self.files(), columns=columns)

    def read_file(self, uri: str, *, columns: list[str] | None = None) -> pa.Table:
        """One of :meth:`files` (inside a Spark task)."""
        if self.format in ("csv", "tsv"):
            return read_delimited(self.storage.read_bytes(uri), delimiter="\t" if self.format == "tsv" else ",")
        return self.storage.read_parquet(uri, columns=columns)

    def __getstate__(self):  # travels to Spark tasks without the warehouse connection
        state = dict(self.__dict__)
        state["_warehouse"] = state["_table"] = None
        return state


def read_delimited(data: bytes, *, delimiter: str) -> pa.Table:
    """A CSV / TSV file with a header row, every column read as a string (the parsers type
    them; inferring would turn an id like ``007`` into the number 7)."""
    import csv

    import pyarrow.csv as pacsv

    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as spreadsheets write
        data = data[3:]
    first = data.split(b"\n", 1)[0].decode("utf-8", "replace")
    names = next(csv.reader([first], delimiter=delimiter), [])
    return pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(delimiter=delimiter),
                          read_options=pacsv.ReadOptions(block_size=1 << 26, encoding="utf8"),
                          convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                               strings_can_be_null=False))
