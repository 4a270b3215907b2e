"""Cost of verifying artifacts against their manifests (issue 12): the share of a warm run spent in
manifest.verify (every reused stage's files streamed through sha256, as in a new process), the time of
`nlrewrite verify` (a full rehash), and the raw hashing rate for larger shapes.

    python benchmarks/verify_cost.py [--preset micro] [--warm-runs 3] [--hash-mb 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import report  # noqa: E402

for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="micro")
    p.add_argument("--warm-runs", type=int, default=3)
    p.add_argument("--hash-mb", type=int, default=256)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PREFECT_HOME", f"{tmp}/prefect")
        from prefect.testing.utilities import prefect_test_harness

        from flows.rewrite import rewrite
        from nlrewrite_core import manifest, storage
        from flows.cli import main as cli

        spent = [0.0]
        real_verify = manifest.verify

        def timed_verify(store, *a, **kw):
            t0 = time.perf_counter()
            try:
                return real_verify(store, *a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        manifest.verify = timed_verify
        root = f"{tmp}/store"
        rows = []
        with prefect_test_harness(server_startup_timeout=120):
            t0 = time.perf_counter()
            rewrite(preset=args.preset, storage=root, run_id="bench")
            cold = time.perf_counter() - t0
            for i in range(args.warm_runs):
                manifest._VERIFIED.clear()  # nothing verified yet, as in a new `nlrewrite run`
                spent[0] = 0.0
                t0 = time.perf_counter()
                rewrite(preset=args.preset, storage=root, run_id="bench")
                warm = time.perf_counter() - t0
                rows.append({"preset": args.preset, "run": f"warm {i + 1}", "run_s": warm, "verify_s": spent[0],
                             "verify_share": spent[0] / warm, "cold_s": cold})
        size = sum(f.stat().st_size for f in Path(root, "artifacts").rglob("*") if f.is_file())
        t0 = time.perf_counter()
        code = cli(["verify", "bench", "--storage", root, "--format", "csv"])
        full = time.perf_counter() - t0
        assert code == 0
        big = Path(tmp, "big.bin")
        with open(big, "wb") as f:
            for _ in range(args.hash_mb):
                f.write(os.urandom(1 << 20))
        store = storage.Store(tmp)
        t0 = time.perf_counter()
        store.file_sha256(str(big))
        rate = args.hash_mb / (time.perf_counter() - t0)
    report("verify_cost", rows, {"artifact_bytes": size, "nlrewrite_verify_s": full, "sha256_mb_per_s": rate})
    print(f"artifacts: {size / 1e6:.1f} MB; `nlrewrite verify` (full rehash): {full:.2f}s; "
          f"sha256 streaming: {rate:.0f} MB/s")


if __name__ == "__main__":
    main()
