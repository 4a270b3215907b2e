"""SQL over a run's tables: DuckDB views over the Parquet files, read in place (local or S3).

DuckDB's httpfs extension cannot be installed offline, so each table is a pyarrow dataset on the
store's filesystem, registered in DuckDB.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from .storage import Store

# view name -> (stage, file name inside the stage directory)
TABLES: dict[str, tuple[str, str]] = {
    "tokens": ("corpus", "tokens"),
    "fit": ("transcoder", "fit"),
    "activations": ("activations", "activations"),
    "latent_stats": ("activations", "latent_stats"),
    "explanations": ("explain", "explanations"),
    "scores": ("score", "scores"),
    "predictions": ("simulate", "predictions"),
    "calibration": ("calibrate", "calibration"),
    "calibrated": ("calibrate", "calibrated"),
    "ce": ("evaluate", "ce"),
    "latent_metrics": ("evaluate", "latent_metrics"),
    "oracle": ("evaluate", "oracle"), "sample_size": ("evaluate", "sample_size"), "score_relation": ("evaluate", "score_relation"),
    "multilayer": ("multilayer", "multilayer"),
}


class RunNotFound(FileNotFoundError):
    """The run id has no run.json under the storage root."""


def load_run(store: Store, run_id: str) -> dict[str, Any]:
    path = store.path("runs", run_id, "run.json")
    if not store.exists(path):
        runs = store.listdir(store.path("runs"))
        raise RunNotFound(f"run {run_id!r} not found under {store.root}/runs"
                          + (f"; runs there: {', '.join(runs)}" if runs else "; no runs there yet"))
    return store.read_json(path)


def table_files(store: Store, stage: str, key: str, name: str) -> list[str]:
    """Paths of a table's Parquet files, from the stage manifest (shards included)."""
    manifest = store.read_manifest(stage, key)
    base = store.artifact_dir(stage, key)
    return [f"{base}/{f['file']}" for f in manifest["files"]
            if f["file"].endswith(".parquet") and f["file"].split("/")[-1] == f"{name}.parquet"]


def _dataset(files: list[str], store: Store) -> ds.Dataset:
    """A dataset of Parquet files; float16 columns (stored predictions) read as float32, which
    DuckDB can scan (it has no half-float type)."""
    d = ds.dataset(files, filesystem=store.fs, format="parquet")
    if any(f.type == pa.float16() for f in d.schema):
        schema = pa.schema([f.with_type(pa.float32()) if f.type == pa.float16() else f for f in d.schema])
        d = ds.dataset(files, filesystem=store.fs, format="parquet", schema=schema)
    return d


def connect(store: Store, run_id: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per table of the run."""
    run = load_run(store, run_id)
    con = duckdb.connect()
    for view, (stage, name) in TABLES.items():
        key = run["keys"].get(stage)
        if key is None or not store.has_manifest(stage, key):
            continue
        files = table_files(store, stage, key, name)
        if files:
            con.register(view, _dataset(files, store))
    return con


def query(store: Store, run_id: str, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run SQL against a run's views; returns (column names, rows)."""
    con = connect(store, run_id)
    cur = con.execute(sql)
    cols = [d[0] for d in cur.description] if cur.description else []
    return cols, cur.fetchall()
