"""flows.prefect_sync: the value of a Prefect `async_dispatch` call made from sync code (what the flows'
progress artifacts and shard runs use), and the id of the flow run the caller runs in."""

from __future__ import annotations

from uuid import UUID

import pytest
from prefect import flow, task
from prefect.artifacts import create_progress_artifact
from prefect.context import FlowRunContext

from flows.prefect_sync import flow_run_id, sync


def test_sync_passes_a_value_and_refuses_a_coroutine():
    assert sync(3) == 3

    async def later() -> int:
        return 3

    coro = later()
    with pytest.raises(TypeError, match="returned a coroutine"):
        sync(coro)
    assert coro.cr_frame is None  # closed: never left pending


def test_in_a_sync_flow_the_calls_return_values(prefect_server):
    @flow
    def progress_flow() -> tuple[UUID, str, str]:
        ctx = FlowRunContext.get()
        assert ctx is not None and ctx.flow_run is not None
        return sync(create_progress_artifact(50.0, key="prefect-sync-test")), flow_run_id(), str(ctx.flow_run.id)

    progress, got, want = progress_flow()
    assert isinstance(progress, UUID)
    assert got == want


def test_flow_run_id_refuses_a_task(prefect_server):
    @task
    def in_task() -> str:
        return flow_run_id()

    @flow
    def task_flow() -> str:
        return in_task()

    with pytest.raises(RuntimeError, match="not called from a flow run"):
        task_flow()
