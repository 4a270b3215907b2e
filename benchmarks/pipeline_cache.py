"""Cold vs warm pipeline time: `nlrewrite run` twice on a fresh storage root (target warm/cold <= 0.10).

    python benchmarks/pipeline_cache.py [--preset tiny]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402


def timed_run(preset: str, storage: str, env_home: str) -> tuple[float, str]:
    import os

    env = {**os.environ, "PREFECT_HOME": env_home}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", preset, "--storage", storage],
                         capture_output=True, text=True, env=env, check=True)
    return time.perf_counter() - t0, out.stdout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cold, out1 = timed_run(args.preset, f"{tmp}/store", f"{tmp}/prefect")
        warm, out2 = timed_run(args.preset, f"{tmp}/store", f"{tmp}/prefect")
    table1 = out1[out1.index("CE on the eval split"):]
    table2 = out2[out2.index("CE on the eval split"):]
    same = table1.split("run record:")[0] == table2.split("run record:")[0]
    print(table2)
    report("pipeline_cache", [{"preset": args.preset, "cold_s": cold, "warm_s": warm, "warm_over_cold": warm / cold,
                               "same_numbers": same}])


if __name__ == "__main__":
    main()
