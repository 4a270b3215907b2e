"""The Prefect API for `nlrewrite run`: the server in PREFECT_API_URL when one is set, else a temporary
local server that dies with the process that started it, however that process dies.

Prefect's own ephemeral server (SubprocessASGIServer) is stopped by an atexit hook only: a `kill -9`
of `nlrewrite run` left it running forever, ~200 MB each (issue 12). Here the server process is
started through a small launcher that asks Linux to SIGKILL it when its parent dies
(prctl(PR_SET_PDEATHSIG), inherited across exec) and then execs uvicorn; elsewhere the launcher stays
as a watchdog that polls its parent and kills the server when the parent is gone. The server is
the same app Prefect's ephemeral mode runs (prefect.server.api.server:create_app, no UI).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LAUNCHER = r"""
import ctypes, os, signal, subprocess, sys, time
parent, cmd = int(sys.argv[1]), sys.argv[2:]
PR_SET_PDEATHSIG = 1
if sys.platform.startswith("linux") and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(0)
    os.execv(cmd[0], cmd)
child = subprocess.Popen(cmd)  # elsewhere (or prctl refused): stay as a watchdog of the parent
while child.poll() is None:
    if os.getppid() != parent:
        child.kill()
        break
    time.sleep(0.5)
"""


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with code {proc.returncode} before it was "
                                   "healthy; set PREFECT_API_URL to a running server (prefect server start)")
            try:
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the temporary Prefect server was not healthy after {timeout_s:.0f}s "
                       "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")


def _drain() -> None:
    """Send the buffered logs and events to the server before it stops (as prefect_test_harness does)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for drain in (lambda: APILogWorker.instance().drain(), EventsWorker.drain_all):
        with contextlib.suppress(Exception):  # a worker that never started, or a server already gone
            drain()


@contextlib.contextmanager
def temporary_server() -> Iterator[str]:
    """A local Prefect API server on 127.0.0.1 for the duration of the block (yields its API URL),
    bound to this process's life: stopped on exit, killed by the kernel if this process is killed."""
    import prefect
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__module_path__).parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(os.getpid()), *cmd], env=env)
    try:
        _wait_healthy(proc, url, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The configured Prefect API (PREFECT_API_URL), or a `temporary_server` for the block."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield str(PREFECT_API_URL.value())
        return
    with temporary_server() as url:
        yield url
