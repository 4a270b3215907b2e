"""The `nlrewrite` command line: `run` the pipeline (one line per stage on the console, Prefect's lines
in the run's log.txt: flows/console.py), list a storage root's `runs` (flows/runs.py), print a finished
run's `report` again, `evaluate` a finished run again with other patching/evaluation settings, `query`
a run's tables with SQL, list or pull a run's `artifacts`, `verify` a run's artifacts against their
manifests.

Bad input (unknown preset, invalid YAML or config field, unwritable storage, unknown run, unsafe
run id, a statement `query` does not run; for `run` also a CUDA device or LLM backend this machine
lacks, a transcoder checkpoint that is missing, malformed or does not fit, a corpus too small for
its splits: nlrewrite_core.runtime) exits with status 2 and one message naming the field or file
and the fix, before anything is written. A storage failure (full disk, damaged artifact) exits 1
with one line naming the storage root or the file.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Any

from flows.tables import format_table, print_result
from nlrewrite_core import manifest, stages
from nlrewrite_core.config import PRESETS, ConfigError, RewriteConfig, load_config
from nlrewrite_core.llm import LLMError
from nlrewrite_core.storage import DEFAULT_ROOT

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "nlrewrite,nlrewrite_core",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class UsageError(Exception):
    """Bad input reported with exit status 2."""


def check_storage(storage: str) -> None:
    """Fail early if a local storage root cannot be written (nothing is created here)."""
    if storage.startswith("s3://"):
        if len(storage) <= len("s3://") or storage[len("s3://"):].startswith("/"):
            raise UsageError(f"--storage {storage!r}: an S3 root must look like s3://bucket[/prefix]")
        return
    if "://" in storage:
        raise UsageError(f"--storage {storage!r}: use a local directory or s3://bucket/prefix")
    path = Path(storage).resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--storage {storage!r}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--storage {storage!r}: {probe} is not writable; choose a directory you can write")


def open_store(storage: str, endpoint_url: str | None, must_exist: bool = True):
    """A Store for the CLI; an S3 root is checked with one request (missing bucket, rejected or
    missing credentials, unreachable endpoint: exit 2 with a message that never shows a credential)."""
    from nlrewrite_core.storage import StorageError, Store

    check_storage(storage)
    if not storage.startswith("s3://") and must_exist and not Path(storage).is_dir():
        raise UsageError(f"--storage {storage!r} does not exist; run `nlrewrite run` first or pass --storage")
    store = Store(storage, endpoint_url=endpoint_url)
    try:
        store.check()
    except StorageError as e:
        raise UsageError(str(e)) from None
    return store


def check_run_id(run_id: str | None) -> None:
    """A run id names a directory under <root>/runs: only a safe character set (no '/', no '..')."""
    from nlrewrite_core.storage import UnsafeName, check_name

    if run_id is not None:
        try:
            check_name(run_id, "--run-id" if run_id else "run id")
        except UnsafeName as e:
            raise UsageError(str(e)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from nlrewrite_core.storage import UnsafeName, check_name

    check_run_id(args.run_id)
    cfg: RewriteConfig = load_config(args.preset, args.config)
    try:  # the default run id starts with the config's `preset` field, which a YAML file may set
        check_name(cfg.preset, "config field preset")
    except UnsafeName as e:
        raise UsageError(str(e)) from None
    if args.until:
        try:  # a stage this config has (embed: embedding methods; multilayer: layers given)
            stages.order(cfg, args.until)
        except ValueError as e:
            raise UsageError(f"--until: {e}") from None
    check_storage(args.storage)
    if args.storage.startswith("s3://"):
        open_store(args.storage, args.endpoint_url)  # fail fast, before Prefect starts
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if not args.verbose:  # the Hugging Face libraries' own bars (loading weights...) only with --verbose
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from nlrewrite_core.runtime import check_run

    check_run(cfg)  # the machine and the files the config names: CUDA, backends, checkpoint, corpus size
    from flows.console import run_logging
    from flows.rewrite import rewrite  # imports Prefect: only after validation
    from flows.runs import RunFiles
    from flows.server import prefect_api
    from nlrewrite_core.storage import Store

    store = Store(args.storage, endpoint_url=args.endpoint_url)
    run_id = args.run_id or stages.default_run_id(cfg)  # the name the flow gives it
    files = RunFiles(store, run_id, cfg.preset, args.argv)
    params: dict[str, Any] = {"preset": args.preset, "storage": args.storage, "run_id": args.run_id,
                              "endpoint_url": args.endpoint_url,
                              "config_file": str(Path(args.config).resolve()) if args.config else None}
    if args.until:
        params["until"] = args.until
    # A ConfigError raised inside the flow (the corpus stage's split sizes on the built corpus) exits 2
    # and leaves no file; any other failure is recorded in invocation.json.
    with files.recording(refused=(ConfigError, UsageError, UnsafeName)):
        print(f"nlrewrite run {run_id}: preset {cfg.preset}, storage {store.root}"
              + (f", until {args.until}" if args.until else "") + f"\nlog: {files.invocation.log}"
              + (f" (written to {files.log} until the run ends)" if store.is_s3 else ""), file=sys.stderr, flush=True)
        # PREFECT_API_URL, or a temporary server that dies with this process (also on kill -9).
        with run_logging(files.log, args.verbose) as console, prefect_api():
            try:
                result = rewrite(**params)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write outside Store.write_bytes (streamed files)
                    raise store.full_error(e, e.filename or "") from None
                raise
        stopped = args.until not in (None, "report")
        files.end(f"stopped after {args.until}" if stopped else "done")
    if stopped:
        ran = list(dict.fromkeys(s for s, _ in console.finished))
        print(f"\nstopped after {args.until} (--until): stages {', '.join(ran) or 'none'}; "
              f"`nlrewrite run` without --until continues from there")
        return 0
    print_result(cfg.evaluate.positions, result)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nlrewrite_core.config import read_config_file
    from nlrewrite_core.patch import prepare
    from nlrewrite_core.runtime import check_run

    overrides = read_config_file(args.config) if args.config else {}
    store = open_store(args.storage, args.endpoint_url)
    # every check (run, overrides, upstream manifests) before Prefect starts; the flow repeats them
    _, cfg, _, new_run_id = prepare(store, args.run_id, overrides, args.new_run_id, args.endpoint_url,
                                    origin=f"config file {args.config!r}" if args.config else "overrides")
    check_run(cfg)
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from flows.patch_evaluate import patch_evaluate  # imports Prefect: only after validation
    from flows.server import prefect_api

    with prefect_api():
        result = patch_evaluate(run_id=args.run_id, storage=args.storage, endpoint_url=args.endpoint_url,
                                overrides=overrides, new_run_id=new_run_id)
    print(f"upstream of run {args.run_id} reused, nothing recomputed: {', '.join(result['upstream_reused'])}")
    print_result(cfg.evaluate.positions, result)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from flows.runs import RUNS_COLUMNS, list_runs, print_problems

    store = open_store(args.storage, args.endpoint_url)
    rows, problems = list_runs(store)
    print_problems(problems)
    print(format_table(RUNS_COLUMNS, rows, args.format))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flows.runs import NotFinished, finished_result
    from nlrewrite_core.query import RunNotFound

    check_run_id(args.run_id)
    store = open_store(args.storage, args.endpoint_url)
    try:
        positions, result = finished_result(store, args.run_id)
    except (RunNotFound, NotFinished) as e:
        raise UsageError(str(e)) from None
    print(f"report: {result['report']}")
    print_result(positions, result)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from nlrewrite_core.query import QueryRefused, RunNotFound, query

    check_run_id(args.run_id)
    store = open_store(args.storage, args.endpoint_url)
    try:
        cols, rows = query(store, args.run_id, args.sql, memory_limit=args.memory_limit)
    except (RunNotFound, QueryRefused) as e:
        raise UsageError(str(e)) from None
    except Exception as e:  # duckdb errors: bad SQL, unknown table
        if type(e).__module__.startswith("duckdb") or "duckdb" in type(e).__module__:
            raise UsageError("SQL error: " + " ".join(str(e).split())) from None
        raise
    print(format_table(cols, rows, args.format))
    return 0


def _run_stages(store, run_id: str, stage: list[str] | None) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    from nlrewrite_core.query import RunNotFound, load_run

    check_run_id(run_id)
    try:
        run = load_run(store, run_id)
    except RunNotFound as e:
        raise UsageError(str(e)) from None
    keys: dict[str, str] = run["keys"]
    if stage:
        unknown = [s for s in stage if s not in keys]
        if unknown:
            raise UsageError(f"--stage {', '.join(unknown)}: not a stage of run {run_id!r}; "
                             f"stages: {', '.join(keys)}")
    return run, [(s, k) for s, k in keys.items() if not stage or s in stage]


def cmd_artifacts_ls(args: argparse.Namespace) -> int:
    store = open_store(args.storage, args.endpoint_url)
    _, chosen = _run_stages(store, args.run_id, args.stage)
    cols = ["stage", "key", "file", "size", "etag", "last_modified"] + (["url"] if args.presign else [])
    rows: list[list[Any]] = []
    for stage, key in chosen:
        base = store.artifact_dir(stage, key)
        for o in store.list_objects(base):
            row = [stage, key, o["key"], o["size"], o["etag"], o["last_modified"]]
            if args.presign:
                row.append(store.presigned_url(f"{base}/{o['key']}", args.expires))
            rows.append(row)
    print(format_table(cols, rows, args.format))
    return 0


def cmd_artifacts_pull(args: argparse.Namespace) -> int:
    from nlrewrite_core.storage import Store

    store = open_store(args.storage, args.endpoint_url)
    run, chosen = _run_stages(store, args.run_id, args.stage)
    dest = Store(args.dest)  # the copy is itself a local storage root: `nlrewrite query ID --storage DEST`
    check_storage(args.dest)
    n = 0
    for stage, key in chosen:
        got = store.download(store.artifact_dir(stage, key), dest.artifact_dir(stage, key))
        print(f"{stage}/{key}: {got} files", file=sys.stderr)
        n += got
    dest.write_json(dest.path("runs", args.run_id, "run.json"), run)
    print(f"pulled {n} files of run {args.run_id} into {dest.root}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify every artifact of a run (each file's sha256, size and rows against its manifest,
    sub-artifacts such as simulation shards included), rehashing everything. With --repair the
    manifest of each damaged (sub-)artifact is removed: the next `nlrewrite run` recomputes exactly
    those. Exit 0 when all are intact (or repaired), 1 when damage was found and left."""
    import time

    store = open_store(args.storage, args.endpoint_url)
    _, chosen = _run_stages(store, args.run_id, args.stage)
    rows: list[list[Any]] = []
    damaged: list[tuple[str, str, str]] = []
    total_bytes, t0 = 0, time.perf_counter()
    for stage, key in chosen:
        for sub in ["", *store.sub_artifacts(stage, key)]:
            t1 = time.perf_counter()
            problems = manifest.verify(store, stage, key, sub, rehash=True)
            n_files, size = 0, 0
            if not problems:
                m = store.read_manifest(stage, key, sub)
                n_files, size = len(m["files"]), sum(f.get("size") or 0 for f in m["files"])
                total_bytes += size if not sub else 0  # a shard's files are counted in the stage's list
            else:
                damaged.append((stage, key, sub))
                for p in problems:
                    print(f"damaged: {p}", file=sys.stderr)
            rows.append([stage + (f"/{sub}" if sub else ""), key, "ok" if not problems else
                         f"DAMAGED ({len(problems)})", n_files, size, round(time.perf_counter() - t1, 3)])
    print(format_table(["artifact", "key", "status", "files", "bytes", "seconds"], rows, args.format))
    print(f"verified {len(rows)} artifacts of run {args.run_id} ({total_bytes} bytes) in "
          f"{time.perf_counter() - t0:.2f}s: {len(damaged)} damaged", file=sys.stderr)
    if damaged and args.repair:
        for stage, key, sub in damaged:
            store.invalidate(stage, key, sub)
            if sub:  # the stage's own manifest lists the shard's files
                store.invalidate(stage, key)
        print(f"repaired: removed the manifests of {len(damaged)} damaged artifacts; `nlrewrite run` with the "
              "run's config recomputes them", file=sys.stderr)
        return 0
    return 1 if damaged else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nlrewrite", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the pipeline (every finished stage is reused from cache)")
    r.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)}")
    r.add_argument("--config", help="YAML file overriding any config field")
    r.add_argument("--storage", default=DEFAULT_ROOT, help="local directory or s3://bucket/prefix")
    r.add_argument("--run-id", help="name of the run (default: <preset>-<content key>)")
    r.add_argument("--endpoint-url", help="S3 endpoint for non-AWS S3")
    r.add_argument("--until", choices=stages.NAMES, metavar="STAGE",  # the registry's order; loads no torch
                   help=f"run the stages up to and including STAGE, then stop ({' '.join(stages.NAMES)})")
    r.add_argument("--verbose", action="store_true",
                   help="also show Prefect's and nlrewrite's log lines (always in <storage>/runs/<id>/log.txt)")
    r.set_defaults(func=cmd_run)
    rs = sub.add_parser("runs", help="list the runs of a storage root: id, preset, started, finished, report")
    rs.add_argument("--storage", default=DEFAULT_ROOT, help="local directory or s3://bucket/prefix")
    rs.add_argument("--endpoint-url", help="S3 endpoint for non-AWS S3")
    rs.add_argument("--format", choices=["table", "csv", "json"], default="table")
    rs.set_defaults(func=cmd_runs)
    rp = sub.add_parser("report", help="a finished run's report path and CE headline table")
    rp.add_argument("run_id")
    rp.add_argument("--storage", default=DEFAULT_ROOT, help="local directory or s3://bucket/prefix")
    rp.add_argument("--endpoint-url", help="S3 endpoint for non-AWS S3")
    rp.set_defaults(func=cmd_report)
    e = sub.add_parser("evaluate", help="calibrate, evaluate and report a finished run again (patch-evaluate): "
                                        "nothing upstream is recomputed")
    e.add_argument("run_id", help="the finished run (its runs/RUN_ID/run.json)")
    e.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file overriding the calibrate, evaluate or report sections only")
    e.add_argument("--storage", default=DEFAULT_ROOT, help="local directory or s3://bucket/prefix")
    e.add_argument("--run-id", dest="new_run_id", metavar="NEW",
                   help="name of the new run (default: <preset>-<content key>, as `nlrewrite run` names it)")
    e.add_argument("--endpoint-url", help="S3 endpoint for non-AWS S3")
    e.set_defaults(func=cmd_evaluate)
    q = sub.add_parser("query", help="SQL over a run's tables (DuckDB)")
    q.add_argument("run_id")
    q.add_argument("sql")
    q.add_argument("--storage", default=DEFAULT_ROOT)
    q.add_argument("--endpoint-url")
    q.add_argument("--format", choices=["table", "csv", "json"], default="table")
    q.add_argument("--memory-limit", default="2GB", help="DuckDB memory limit (beyond it sorts and joins spill to "
                   "a temporary directory)")
    q.set_defaults(func=cmd_query)
    v = sub.add_parser("verify", help="check every artifact of a run against its manifest (sha256, size, rows)")
    v.add_argument("run_id")
    v.add_argument("--repair", action="store_true",
                   help="remove the manifests of damaged artifacts so that the next `nlrewrite run` recomputes them")
    v.add_argument("--storage", default=DEFAULT_ROOT, help="local directory or s3://bucket/prefix")
    v.add_argument("--endpoint-url", help="S3 endpoint for non-AWS S3")
    v.add_argument("--stage", action="append", help="only this stage (repeatable)")
    v.add_argument("--format", choices=["table", "csv", "json"], default="table")
    v.set_defaults(func=cmd_verify)
    a = sub.add_parser("artifacts", help="list or download a run's artifacts (local or S3)")
    asub = a.add_subparsers(dest="artifacts_command", required=True)
    ls = asub.add_parser("ls", help="list a run's artifact files")
    ls.add_argument("run_id")
    pull = asub.add_parser("pull", help="download a run's artifacts into a local storage root DEST")
    pull.add_argument("run_id")
    pull.add_argument("dest")
    for sp in (ls, pull):
        sp.add_argument("--storage", default=DEFAULT_ROOT, help="local directory or s3://bucket/prefix")
        sp.add_argument("--endpoint-url", help="S3 endpoint for non-AWS S3")
        sp.add_argument("--stage", action="append", help="only this stage (repeatable)")
    ls.add_argument("--format", choices=["table", "csv", "json"], default="table")
    ls.add_argument("--presign", action="store_true", help="add a presigned HTTPS URL per file (S3)")
    ls.add_argument("--expires", type=int, default=3600, help="presigned URL lifetime in seconds")
    ls.set_defaults(func=cmd_artifacts_ls)
    pull.set_defaults(func=cmd_artifacts_pull)
    return p


def main(argv: list[str] | None = None) -> int:
    from nlrewrite_core.query import ArtifactDamaged
    from nlrewrite_core.storage import StorageError, UnsafeName

    args = parser().parse_args(argv)
    args.argv = ["nlrewrite", *(sys.argv[1:] if argv is None else argv)]
    try:
        return args.func(args)
    except (ConfigError, UsageError, UnsafeName) as e:
        print("nlrewrite: error: " + str(e).replace("\n", " "), file=sys.stderr)  # always one line
        return 2
    except (StorageError, ArtifactDamaged) as e:  # full disk, damaged artifact: one line naming the root or file
        print("nlrewrite: error: " + str(e).replace("\n", " "), file=sys.stderr)
        return 1
    except LLMError as e:  # an LLM endpoint that failed for good (after its retries): the reason, one line
        print("nlrewrite: error: " + str(e).replace("\n", " "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
