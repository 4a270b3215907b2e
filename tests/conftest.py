"""Shared fixtures: one Prefect test server for the session, one finished micro run, and the upstream
stages of a smaller micro config. Session fixtures are read only: a test that changes or damages
artifacts works on a copy (copy_run, copy_artifacts)."""

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

import contextlib  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: tiny models gain nothing from two, and lose a lot on a shared machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def moto_s3(env: dict[str, str], buckets: tuple[str, ...]) -> Iterator[str]:
    """A real S3 endpoint (moto) on 127.0.0.1 with `env` (AWS credentials) set; yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for bucket in buckets:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
    try:
        yield url
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def micro_run(prefect_server, tmp_path_factory):
    """The `rewrite` flow on the micro preset, run once for the session: (storage dir, result)."""
    from flows.rewrite import rewrite

    import torch

    storage = str(tmp_path_factory.mktemp("store"))
    result = rewrite(preset="micro", storage=storage, run_id="micro-test")
    result["torch_threads"] = torch.get_num_threads()  # runs compared byte for byte with it must use the same
    return storage, result


SMALL = {"corpus": {"n_calib": 2, "n_eval": 2}, "transcoder": {"num_latents": 16, "k": 4}}
"""Overrides of the micro preset for stage-level tests that run costly methods (LLMs, embeddings) on
every latent: 16 latents, 2 calib and 2 eval sequences."""


@pytest.fixture(scope="session")
def small_upstream(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """Corpus, subject, transcoder, activations and (ngram) explain of micro + SMALL, computed once for
    the session with the stage functions: (storage dir, stage keys). Copy it before writing to it."""
    from nlrewrite_core import stages
    from nlrewrite_core.config import load_config
    from nlrewrite_core.storage import Store

    cfg = load_config("micro", overrides=SMALL)
    keys = stages.plan(cfg)
    storage = str(tmp_path_factory.mktemp("small") / "store")
    store = Store(storage)
    stages.run_all(store, cfg, keys, until="explain")
    return storage, keys


def copy_artifacts(src: str, dst: str, keys: dict[str, str], stage_names: tuple[str, ...]) -> None:
    """Copy the artifacts of `stage_names` (at `keys`) from the local store `src` into the local store
    `dst`: a test starts from the micro run's upstream stages instead of recomputing them."""
    for stage in stage_names:
        rel = os.path.join("artifacts", stage, keys[stage])
        shutil.copytree(os.path.join(src, rel), os.path.join(dst, rel))


def copy_run(src: str, dst: str) -> str:
    """A private copy of a finished local store (`src`), free to change or damage; returns `dst`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    return dst
