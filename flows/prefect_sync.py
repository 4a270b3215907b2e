"""The results of Prefect calls made from the nlrewrite flows, typed as what they are.

Prefect's `create_progress_artifact`, `run_deployment` and the other `async_dispatch` functions return
a coroutine when called from async code and their value when called from sync code; their type is the
union of both. The nlrewrite flows and tasks are sync, so these calls return their value: `sync` says so
to the type checker (and refuses a coroutine instead of passing it on). `flow_run_id` is the id of the
flow run the caller runs in.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from prefect.context import FlowRunContext, get_run_context

T = TypeVar("T")


def sync(result: T | Coroutine[Any, Any, T]) -> T:
    """The value of an `async_dispatch` Prefect call made from sync code (a sync flow or task)."""
    if isinstance(result, Coroutine):
        result.close()  # never awaited: closed, so no "coroutine was never awaited" warning follows the error
        raise TypeError("a Prefect call returned a coroutine: the nlrewrite flows call Prefect from sync code")
    return result


def flow_run_id() -> str:
    """The id of the flow run the caller runs in (in its flow function, not in a task)."""
    ctx = get_run_context()
    if not isinstance(ctx, FlowRunContext) or ctx.flow_run is None:
        raise RuntimeError("flow_run_id: not called from a flow run")
    return str(ctx.flow_run.id)
