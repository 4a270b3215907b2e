"""Prefect task retries fire only for errors a retry can fix (issue 12): network, S3, LLM 429/5xx, timeouts."""

from __future__ import annotations

import errno

import pytest

from nlrewrite_core.config import ConfigError
from nlrewrite_core.llm import LLMError
from nlrewrite_core.transient import is_transient


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _boto_endpoint():
    from botocore.exceptions import EndpointConnectionError

    return EndpointConnectionError(endpoint_url="http://127.0.0.1:1")


def _httpx_connect():
    import httpx

    return httpx.ConnectError("refused")


def _chained() -> Exception:
    try:
        raise ConnectionResetError("peer reset")
    except ConnectionResetError as e:
        try:
            raise RuntimeError("upload failed") from e
        except RuntimeError as r:
            return r


TRANSIENT = {
    "llm 503 after its retries": lambda: LLMError("openai: ... HTTP 503", retryable=True),
    "timeout": lambda: TimeoutError("read timed out"),
    "connection refused": lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    "httpx connect": _httpx_connect,
    "boto endpoint": _boto_endpoint,
    "s3 slow down": lambda: _client_error("SlowDown", 503),
    "s3 500": lambda: _client_error("InternalError", 500),
    "pyarrow s3 network": lambda: OSError("When reading information for key 'a' in bucket 'b': AWS Error "
                                          "NETWORK_CONNECTION during HeadObject operation: curlCode: 7"),
    "raised from a reset": _chained,
}
PERMANENT = {
    "config": lambda: ConfigError("explain.llm.base_url: required"),
    "value": lambda: ValueError("bad shape"),
    "missing file": lambda: FileNotFoundError(errno.ENOENT, "no such file", "x.parquet"),
    "llm 401": lambda: LLMError("openai: HTTP 401", retryable=False),
    "s3 access denied": lambda: _client_error("AccessDenied", 403),
    "disk full": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "key error": lambda: KeyError("condition"),
}


@pytest.mark.parametrize("name", sorted(TRANSIENT))
def test_transient(name):
    assert is_transient(TRANSIENT[name]())


@pytest.mark.parametrize("name", sorted(PERMANENT))
def test_permanent(name):
    assert not is_transient(PERMANENT[name]())


def test_llm_error_keeps_retryable_through_pickle():
    import pickle

    assert pickle.loads(pickle.dumps(LLMError("x", retryable=True))).retryable is True


def test_every_stage_task_retries_only_transient_errors():
    from prefect import Task

    import tasks.stages as t

    from nlrewrite_core.stages import STAGES

    found = [*t.TASKS.values(), *t.SHARD_TASKS.values()]
    assert all(isinstance(v, Task) for v in found)
    assert len(found) == len(STAGES) + 1 and all(v.retry_condition_fn is t.retry_on_transient for v in found)
    assert t.TASKS["explain"].retries == 2 and t.SHARD_TASKS["simulate"].retries == 2
    # each task is named after its stage function (one name per concept)
    assert {v.name for v in found} == {s.function for s in STAGES} | {"simulate_shard"}


@pytest.mark.parametrize("name, attempts", [("llm 503 after its retries", 3), ("httpx connect", 3),
                                            ("config", 1), ("missing file", 1), ("value", 1)])
def test_prefect_retries_follow_the_condition(prefect_server, name, attempts):
    from prefect import flow, task

    from tasks.stages import retry_on_transient

    make = {**TRANSIENT, **PERMANENT}[name]
    calls = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_on_transient)
    def failing() -> None:
        calls.append(1)
        raise make()

    @flow
    def f() -> None:
        failing()

    state = f(return_state=True)
    assert state.is_failed() and len(calls) == attempts
