"""Sentence embeddings (nlrewrite_core/embedding.py) and the embed stage's progress."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from conftest import copy_run
from nlrewrite_core import artifacts, stages
from nlrewrite_core.config import EmbeddingConfig, load_config
from nlrewrite_core.embedding import embed_texts, load_model
from nlrewrite_core.progress import Step
from nlrewrite_core.storage import Store


def test_on_batch_counts_every_batch_and_changes_no_number():
    cfg = EmbeddingConfig(batch_size=8)
    texts = [f"the {'very ' * (i % 5)}cat number {i}" for i in range(37)]
    seen: list[int] = []
    with_hook = embed_texts(texts, cfg, on_batch=seen.append)
    assert seen == [8, 8, 8, 8, 5]
    assert np.array_equal(with_hook, embed_texts(texts, cfg))
    assert not load_model(cfg.model)._forward_hooks  # the hook is removed after the call


class Steps(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.steps: list[Step] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(getattr(record, "progress", None), Step):
            self.steps.append(record.progress)  # type: ignore[attr-defined]


def test_embed_stage_counts_every_text_up_to_its_total(micro_run, tmp_path):
    """Recomputed in a copy of the session's micro run, the embed stage reports its progress as texts
    embedded (every simulated window, then every vocabulary token) up to that total, and writes the
    same tables as the run did."""
    storage, result = micro_run
    keys = result["keys"]
    store = Store(copy_run(storage, str(tmp_path / "store")))
    shutil.rmtree(Path(store.root) / "artifacts" / "embed" / keys["embed"])
    handler, logger = Steps(), logging.getLogger("nlrewrite.progress")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        stages.run("embed", store, load_config("micro"), keys)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    done = [s.done for s in handler.steps]
    n_contexts = artifacts.read_table(store, "embed", keys["embed"], "contexts", columns=["split"]).num_rows
    vocab = artifacts.read_table(store, "embed", keys["embed"], "token_embeddings", columns=["token"]).num_rows
    assert {(s.stage, s.total, s.unit) for s in handler.steps} == {("embed", n_contexts + vocab, "texts")}
    assert done == sorted(done) and done[-1] == n_contexts + vocab and len(done) > 2
    for table in ("contexts", "token_embeddings"):
        assert artifacts.read_table(store, "embed", keys["embed"], table).equals(
            artifacts.read_table(Store(storage), "embed", keys["embed"], table)), table
