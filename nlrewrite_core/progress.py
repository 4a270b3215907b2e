"""Progress events: what a stage is doing, for whoever renders it (the CLI's console, flows/console.py).

The library only emits: a stage event when a stage is found cached, starts computing, or finishes
(`stage_event`), and a step count for long work inside a stage (`advance`: subject training steps,
embedding windows, simulation shards, CE runs). Both are DEBUG records on the `nlrewrite.progress`
logger carrying a `progress` attribute (a StageEvent or a Step), so Prefect's logs never show them
unless asked, and a handler that wants them reads the attribute instead of parsing text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("nlrewrite.progress")


@dataclass(frozen=True)
class StageEvent:
    """A stage was found `cached`, started `running`, or is `done` after `seconds`."""

    stage: str
    state: Literal["cached", "running", "done"]
    sub: str = ""
    """The part of a sharded stage (e.g. `shard-00003`), empty for the whole stage."""
    seconds: float | None = None


@dataclass(frozen=True)
class Step:
    """`done` of `total` units of long work inside a stage (e.g. 120 of 400 subject steps)."""

    stage: str
    done: int
    total: int
    unit: str


def stage_event(stage: str, state: Literal["cached", "running", "done"], sub: str = "",
                seconds: float | None = None) -> None:
    ev = StageEvent(stage, state, sub, seconds)
    log.debug("%s%s: %s", stage, f"/{sub}" if sub else "", state, extra={"progress": ev})


def advance(stage: str, done: int, total: int, unit: str) -> None:
    log.debug("%s: %d / %d %s", stage, done, total, unit, extra={"progress": Step(stage, done, total, unit)})
