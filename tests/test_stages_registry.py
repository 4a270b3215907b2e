"""The stage registry (nlrewrite_core.stages): each stage declared once, and everything reads it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nlrewrite_core import stages
from nlrewrite_core.config import load_config


def test_every_stage_follows_its_upstream_and_resolves():
    llm = {"backend": "transformers", "model": "m"}
    configs = [load_config("micro"), load_config("micro", overrides={"multilayer": {"layers": [1]}}),
               load_config("micro", overrides={"score": {"method": "embedding"}}),
               load_config("micro", overrides={"simulate": {"method": "llm", "llm": llm}})]
    for cfg in configs:
        names = [s.name for s in stages.order(cfg)]
        for i, stage in enumerate(stages.order(cfg)):
            assert set(stage.upstream(cfg)) <= set(names[:i]), stage.name
        assert list(stages.plan(cfg)) == names
    functions = [s.function for s in stages.STAGES] + [s.shard_function for s in stages.STAGES if s.sharded]
    assert len(set(functions)) == len(functions)  # one task name per stage function
    for stage in stages.STAGES:
        fn = stage.resolve()
        assert callable(fn) and fn.__name__ == stage.function
        assert fn.__module__ == f"nlrewrite_core.stages.{stage.module or stage.name}"
        if stage.sharded:
            assert stage.resolve(shard=True).__name__ == stage.shard_function
        else:
            with pytest.raises(ValueError, match="no shard function"):
                stage.resolve(shard=True)


def test_order_until_and_enabled_stages():
    micro = load_config("micro")
    assert [s.name for s in stages.order(micro, "explain")] == ["corpus", "subject", "transcoder", "activations",
                                                                  "explain"]
    assert "multilayer" not in stages.plan(micro)
    with pytest.raises(ValueError, match="not part of this config's pipeline"):
        stages.order(micro, "multilayer")
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        stages.order(micro, "nope")
    llm = {"backend": "transformers", "model": "m"}
    no_embed = load_config("micro", overrides={"simulate": {"method": "llm", "llm": llm}})
    assert "embed" not in stages.plan(no_embed) and "embed" in stages.plan(micro)
    assert stages.default_run_id(micro) == f"micro-{stages.plan(micro)['report'][:10]}"


def test_planning_imports_no_torch():
    """The registry names its functions; their modules (torch, transformers) load on first use only."""
    code = ("import sys\nfrom nlrewrite_core import stages\nfrom nlrewrite_core.config import load_config\n"
            "stages.plan(load_config('tiny'))\nassert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_all_runs_a_prefix_in_this_process(tmp_path):
    from nlrewrite_core.storage import Store

    cfg = load_config("micro")
    keys = stages.plan(cfg)
    store = Store(str(tmp_path))
    refs = stages.run_all(store, cfg, keys, until="subject")
    assert list(refs) == ["corpus", "subject"]
    assert store.has_manifest("subject", keys["subject"]) and not store.has_manifest("transcoder", keys["transcoder"])
    with pytest.raises(ValueError, match="has no shards"):
        stages.run("corpus", store, cfg, keys, shard=0)
