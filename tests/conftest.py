"""Shared fixtures: one Prefect test server for the session, and one finished micro run."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="nlrewrite-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nlrewrite,nlrewrite_core")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def micro_run(prefect_server, tmp_path_factory):
    """The `rewrite` flow on the micro preset, run once for the session: (storage dir, result)."""
    from flows.rewrite import rewrite

    storage = str(tmp_path_factory.mktemp("store"))
    result = rewrite(preset="micro", storage=storage, run_id="micro-test")
    return storage, result
