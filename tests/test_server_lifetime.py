"""The temporary Prefect server of `nlrewrite run` dies with it, also on kill -9 (issue 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"), pytest.mark.slow]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_kill_9_of_nlrewrite_run_takes_its_server_along(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect-home"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    log = open(tmp_path / "run.log", "wb")
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--preset", "micro", "--storage",
                            str(tmp_path / "store")], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, server = time.time() + 180, None
        while time.time() < deadline and run.poll() is None:  # until the run has its server and is running stages
            server = next((p for p in _children(run.pid) if "uvicorn" in _cmdline(p)), server)
            if server and b"  corpus       running" in (tmp_path / "run.log").read_bytes():  # the first stage line
                break
            time.sleep(0.5)
        assert run.poll() is None and server is not None, (tmp_path / "run.log").read_text()
        assert _alive(server)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.time() + 30
        while _alive(server) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(server), f"server {server} outlived nlrewrite run: {_cmdline(server)}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        log.close()
