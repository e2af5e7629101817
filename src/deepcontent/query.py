"""The warehouse's Iceberg tables in DuckDB, for ad-hoc SQL across them.

    from deepcontent.query import duckdb_connection
    con = duckdb_connection(warehouse)                  # every table of the catalog
    con.sql("SELECT t.artist, count(*) FROM similar_tracks s JOIN tracks t USING (track_id) GROUP BY 1")

Each table is read through pyiceberg's Arrow path at its current snapshot (position deletes of
merge-on-read upserts applied, as every Iceberg reader applies them) and registered in an
in-memory DuckDB connection under its own name. A reader of a cluster's catalog (REST, Glue,
Postgres) gets the same tables with ``Warehouse.from_config`` on that config; Spark and Trino
read them through their Iceberg connectors (docs/architecture.md, "Datasets and tables").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from deepcontent.datasets import TABLES

if TYPE_CHECKING:
    import duckdb

    from deepcontent.warehouse import Warehouse

__all__ = ["duckdb_connection"]


def duckdb_connection(warehouse: "Warehouse", *, tables: Iterable[str] | None = None,
                      connection: "duckdb.DuckDBPyConnection | None" = None) -> "duckdb.DuckDBPyConnection":
    """An in-memory DuckDB connection (or ``connection``) with the warehouse's tables as views.

    Parameters
    ----------
    warehouse : Warehouse
    tables : iterable of str, optional
        Which tables (default: every table of :data:`deepcontent.datasets.TABLES` the catalog
        has created).
    connection : duckdb connection, optional

    Raises
    ------
    ImportError
        If DuckDB is not installed (``pip install duckdb``).
    ValueError
        If a named table is not one of the catalog's.
    """
    try:
        import duckdb
    except ImportError as exc:  # an optional dependency: say how to get it
        raise ImportError("deepcontent.query needs DuckDB: pip install duckdb") from exc
    names = (list(tables) if tables is not None
             else [n for n in TABLES if warehouse.catalog.table_exists(warehouse.identifier(n))])
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise ValueError(f"unknown warehouse tables {unknown}; the catalog's tables are {sorted(TABLES)}")
    con = connection or duckdb.connect(database=":memory:")
    for name in names:
        warehouse.table(name).scan().to_duckdb(name, connection=con)
    return con
