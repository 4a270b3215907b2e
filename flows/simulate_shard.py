"""The `simulate-shard` flow: one range of simulation shards, for fan-out to GPU workers.

The `rewrite` flow launches it through the `simulate-shard/gpu` deployment when
`execution.fanout` is `deployment`. It gets the full resolved config (not a preset name), so a
worker computes exactly the keys its parent planned; `expected_key` guards against a worker
running other code than its parent (another stage version gives another key).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import flow, get_run_logger

from nlrewrite_core import runtime, stages
from nlrewrite_core.config import RewriteConfig
from nlrewrite_core.patch import default_run_id
from nlrewrite_core.storage import Store
from tasks import stages as t
from tasks.context import RunContext
from tasks.stages import ensure


def run_shards(run: RunContext, store: Store, shards: list[int]) -> dict[str, Any]:
    """Run the given shards as tasks (a shard with a manifest is returned at once)."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    rows = 0
    for i, shard in enumerate(shards):
        ref = ensure(t.simulate_shard, "simulate", run, store, shard=shard)
        rows += ref.rows.get("predictions", 0)
        logger.info("simulate-shard: %d / %d shards of this run done (shard %d)", i + 1, len(shards), shard)
    return {"shards": shards, "rows": rows, "wall_s": round(time.perf_counter() - t0, 3)}


@flow(name="simulate-shard", log_prints=True)
def simulate_shard_range(config: dict[str, Any], storage: str, shards: list[int], run_id: str = "",
                         endpoint_url: str | None = None, expected_key: str | None = None) -> dict[str, Any]:
    """Simulate one range of shards of a run (launched by `rewrite` with `execution.fanout: deployment`)."""
    logging.getLogger("nlrewrite").setLevel(logging.INFO)
    cfg = RewriteConfig.model_validate(config)
    keys = stages.plan(cfg)
    if expected_key is not None and keys["simulate"] != expected_key:
        raise RuntimeError(f"simulate-shard: this worker plans simulate key {keys['simulate']}, the parent run "
                           f"expects {expected_key}: worker and flow run different nlrewrite versions")
    store = Store(storage, endpoint_url=endpoint_url)
    store.check()
    runtime.apply_threads(cfg)
    run = RunContext(run_id=run_id or default_run_id(cfg, keys), storage=storage,
                     endpoint_url=endpoint_url, config=cfg, stage_keys=keys)
    return run_shards(run, store, list(shards))
