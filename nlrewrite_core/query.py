"""SQL over a run's tables: DuckDB views over the Parquet files, read in place (local or S3).

DuckDB's httpfs extension cannot be installed offline, so each table is a pyarrow dataset on the
store's filesystem, registered in DuckDB (`stage_dataset`: the one place that tells local from S3).
That is also what lets `query` lock DuckDB down: pyarrow, not DuckDB, opens the files (local or
S3), so after the views are registered DuckDB's external access is disabled and its configuration
locked, and the views still scan lazily, batch by batch (memory stays bounded by DuckDB's
memory_limit plus pyarrow's read batches; nothing is materialised).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from . import manifest
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
    "oracle": ("evaluate", "oracle"), "sample_size": ("evaluate", "sample_size"),
    "score_relation": ("evaluate", "score_relation"),
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


def stage_dataset(store: Store, stage: str, key: str, name: str) -> ds.Dataset:
    """A stage table (all its Parquet files, from the manifest) as one dataset on the store's
    filesystem, local or S3, ready to register in DuckDB; nothing is read until it is scanned."""
    return _dataset(table_files(store, stage, key, name), store)


def connect(store: Store, run_id: str, con: duckdb.DuckDBPyConnection | None = None
            ) -> tuple[duckdb.DuckDBPyConnection, dict[str, tuple[str, str]], dict[str, str]]:
    """A DuckDB connection (`con`, or a new one) with one view per table of the run; returns it,
    {view: (stage, key)} of the views and {view: problem} of those whose files cannot be read
    (not registered). An unreadable manifest raises ArtifactInvalid."""
    run = load_run(store, run_id)
    con = con if con is not None else duckdb.connect()
    views: dict[str, tuple[str, str]] = {}
    broken: dict[str, str] = {}
    for view, (stage, name) in TABLES.items():
        key = run["keys"].get(stage)
        if key is None or not store.has_manifest(stage, key):
            continue
        files = table_files(store, stage, key, name)
        if files:
            views[view] = (stage, key)
            try:
                con.register(view, _dataset(files, store))
            except (OSError, pa.ArrowException) as e:  # a file that is not Parquet (any more)
                broken[view] = (manifest.verify(store, stage, key) or [" ".join(str(e).split())])[0]
    return con, views, broken


class ArtifactDamaged(RuntimeError):
    """A queried table's files do not match their manifest."""


def damaged_message(problem: str, run_id: str) -> str:
    return f"{problem}; run `nlrewrite verify {run_id} --repair` then `nlrewrite run` to recompute it"


class QueryRefused(ValueError):
    """A statement `nlrewrite query` does not run (anything but a read)."""


READ_ONLY = "SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN"


def _explained(statement: str) -> str:
    """The statement an EXPLAIN [ANALYZE] statement explains (comments skipped, by DuckDB's tokenizer)."""
    words = [(pos, tok) for pos, tok in duckdb.tokenize(statement) if tok != duckdb.token_type.comment]
    i = 1  # words[0] is EXPLAIN
    if i < len(words) and statement[words[i][0]:].lower().startswith("analyze"):
        i += 1
    return statement[words[i][0]:] if i < len(words) else ""


def check_read_only(sql: str) -> None:
    """Refuse (QueryRefused) any SQL that is not one or more read statements, as DuckDB's own parser
    sees them: SELECT and what parses as one (WITH, FROM-first, VALUES, DESCRIBE, SHOW, SUMMARIZE),
    and EXPLAIN [ANALYZE] of those. COPY, ATTACH, INSTALL, LOAD, SET, PRAGMA, CALL, CREATE, PIVOT... are
    refused. (The connection also has external access disabled and its configuration locked, so a
    read cannot reach a file either: this check gives the clear message.) Syntax errors raise
    duckdb's ParserException."""
    statements = duckdb.extract_statements(sql)
    if not statements:
        raise QueryRefused(f"no SQL statement given; run a read ({READ_ONLY})")
    for st in statements:
        kind = st.type
        if kind == duckdb.StatementType.EXPLAIN:
            inner = duckdb.extract_statements(_explained(st.query))
            kind = inner[0].type if len(inner) == 1 else duckdb.StatementType.INVALID
        if kind != duckdb.StatementType.SELECT:
            text = " ".join(st.query.split())
            raise QueryRefused(f"only read statements run here ({READ_ONLY}); refused {st.type.name}: "
                               f"{text[:60]}{'...' if len(text) > 60 else ''}")


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """No file, network or extension access from SQL any more (the registered views keep reading
    through pyarrow), and no SET can undo it."""
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


# Bounds DuckDB's own memory for the stage queries below: larger intermediates spill to a temp dir.
DUCKDB_MEMORY_LIMIT = "2GB"


@contextlib.contextmanager
def bounded_connection(memory_limit: str = DUCKDB_MEMORY_LIMIT) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection whose memory is capped at `memory_limit`; sorts and windows that need
    more spill to a temporary directory, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="nlrewrite-duckdb-") as tmp:
        con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": tmp,
                                     "preserve_insertion_order": False})
        # DuckDB >= 1.4 may rewrite a `row_number() <= n` window as a per-group top-n aggregate,
        # whose states do not spill (it runs out of memory at the cache's scale): keep the window.
        with contextlib.suppress(duckdb.Error):
            con.execute("SET disabled_optimizers = 'top_n_window_elimination'")
        try:
            yield con
        finally:
            con.close()


def top_activations(store: Store, key: str, split: str, seq_ids: np.ndarray, max_candidates: int = 0,
                    memory_limit: str = DUCKDB_MEMORY_LIMIT) -> pa.Table:
    """The explainer's candidate rows of the sparse latent cache (activations stage `key`), selected
    in DuckDB over the stored Parquet files (local or S3) without loading the cache.

    Rows of `split` whose seq_id is in `seq_ids` (filtered in the streaming scan); for each latent
    its top `max_candidates` rows by activation, ties broken by (seq_id, pos) (0: every row), by
    `row_number() OVER (PARTITION BY latent ORDER BY act DESC, seq_id, pos)`. Columns seq_id
    (int64), pos (int32), latent (int32), act (float32), sorted by (latent, act desc, seq_id, pos).

    Memory is bounded by DuckDB's `memory_limit` (the window's sort spills to a temp directory
    beyond it) plus the kept rows returned (about 20 bytes a row: max_candidates x latents at most).
    """
    # The row filter runs in the pyarrow scan (a hash-set lookup per row), not as a DuckDB join,
    # whose planner could build its hash table on the cache side.
    rows = stage_dataset(store, "activations", key, "activations").filter(
        (pc.field("split") == split) & pc.field("seq_id").isin(pa.array(np.asarray(seq_ids), pa.int64())))
    n = int(max_candidates)
    cut = (f"QUALIFY row_number() OVER (PARTITION BY latent ORDER BY act DESC, seq_id, pos) <= {n}"
           if n > 0 else "")
    sql = f"""SELECT seq_id::BIGINT AS seq_id, pos::INTEGER AS pos, latent::INTEGER AS latent, act::FLOAT AS act
              FROM (SELECT seq_id, pos, latent, act FROM activations {cut})
              ORDER BY latent, act DESC, seq_id, pos"""
    with bounded_connection(memory_limit) as con:
        con.register("activations", rows)
        return con.sql(sql).to_arrow_table()


def query(store: Store, run_id: str, sql: str, memory_limit: str = DUCKDB_MEMORY_LIMIT,
          verify: bool = True) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run read-only SQL against a run's views; returns (column names, rows).

    The SQL must be reads only (`check_read_only`, else QueryRefused). The views are registered
    first, then the connection is locked down (`lock_down`) and its memory capped at `memory_limit`
    (sorts and joins beyond it spill to a temporary directory removed on exit). With `verify`, the
    stages of the views the SQL names are verified against their manifests first (manifest.verify:
    streaming sha256; ArtifactDamaged names the file)."""
    check_read_only(sql)
    with bounded_connection(memory_limit) as con:
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        _, views, broken = connect(store, run_id, con)
        lock_down(con)
        named = {n.lower() for st in duckdb.extract_statements(sql)
                 for n in con.get_table_names(st.query, qualified=False)}
        for view in sorted(named & set(broken)):
            raise ArtifactDamaged(damaged_message(broken[view], run_id))
        if verify:
            for stage, key in sorted({views[v] for v in views if v in named}):
                if problems := manifest.verify(store, stage, key):
                    raise ArtifactDamaged(damaged_message(problems[0], run_id))
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, cur.fetchall()
