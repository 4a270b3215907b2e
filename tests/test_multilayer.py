"""Several layers at once: config validation, unchanged single-layer keys, and the micro run."""

from __future__ import annotations

from pathlib import Path

import pytest

from nlrewrite_core import artifacts, stages

from nlrewrite_core.stages import multilayer
from nlrewrite_core.config import ConfigError, load_config
from nlrewrite_core.storage import Store

from conftest import copy_run

EXTRA = {"multilayer": {"layers": [1]}}


@pytest.mark.parametrize("layers, match", [
    ([0], "multilayer.layers: layer 0 is transcoder.layer"),
    ([2], "multilayer.layers: layer 2 is out of range"),
    ([-1], "multilayer.layers: layer -1 is out of range"),
    ([1, 1], "multilayer.layers must be distinct"),
])
def test_bad_layers_are_config_errors(layers, match):
    with pytest.raises(ConfigError, match=match):
        load_config("micro", overrides={"multilayer": {"layers": layers}})


def test_calibrations_must_be_computed():
    with pytest.raises(ConfigError, match="multilayer.calibrations"):
        load_config("micro", overrides={"multilayer": {"layers": [1], "calibrations": ["quantile-hf9"]}})


@pytest.mark.parametrize("preset", ["tiny", "micro", "pythia-160m"])
def test_single_layer_plan_and_dump_unchanged(preset):
    cfg = load_config(preset)
    assert "multilayer" not in cfg.model_dump(mode="json")
    keys = stages.plan(cfg)
    assert "multilayer" not in keys
    assert stages.plan(load_config(preset, overrides={"multilayer": {"layers": []}})) == keys


def test_extra_layers_add_only_the_multilayer_stage():
    base = stages.plan(load_config("micro"))
    cfg = load_config("micro", overrides=EXTRA)
    keys = stages.plan(cfg)
    assert list(keys) == [*base, "multilayer"]
    assert {k: keys[k] for k in base} == base
    # the extra layer's pipeline is the single-layer pipeline of that layer (shared, cached)
    per = multilayer.layer_keys(cfg)
    assert per[0] == base
    assert per[1] == stages.plan(load_config("micro", overrides={"transcoder": {"layer": 1}}))
    assert stages.plan(load_config("micro", overrides={"multilayer": {"layers": [1], "simulate": False}}))[
        "multilayer"] != keys["multilayer"]


@pytest.fixture(scope="module")
def multi_run(micro_run, tmp_path_factory) -> tuple[str, dict, dict]:
    """The rewrite flow with an extra layer (layer 1) on a copy of the micro run's store, run once for
    this module: (storage, the micro run's result, this run's result). The main layer's stages are cache
    hits; layer 1's pipeline (Prefect tasks) and the multilayer stage (patch-evaluate subflow) run."""
    from flows.rewrite import rewrite

    storage, first = micro_run
    copy = copy_run(storage, str(tmp_path_factory.mktemp("multi") / "store"))
    return copy, first, rewrite(preset="micro", storage=copy, run_id="micro-multi", overrides=EXTRA)


def test_micro_two_layers(multi_run, tmp_path):
    """Layer 0 (main) and layer 1 of the micro subject: CE with 1 and 2 layers rewritten. The library
    stage on a copy of the flow's store without layer 1's simulate and calibrate nor the multilayer
    artifact: run_multilayer redoes them (its own layer pipeline) and gives the flow's table."""
    import shutil

    cfg = load_config("micro", overrides=EXTRA)
    keys = stages.plan(cfg)
    per = multilayer.layer_keys(cfg)
    copy = copy_run(multi_run[0], str(tmp_path / "store"))
    for stage, key in (("simulate", per[1]["simulate"]), ("calibrate", per[1]["calibrate"]),
                       ("multilayer", keys["multilayer"])):
        shutil.rmtree(Path(copy, "artifacts", stage, key))
    store = Store(copy)
    ref = stages.run("multilayer", store, cfg, keys)
    assert store.has_manifest("multilayer", keys["multilayer"])
    t = artifacts.read_table(store, "multilayer", keys["multilayer"], "multilayer").to_pylist()
    by = {(r["n_layers"], r["condition"], r["calibration"], r["positions"]): r for r in t}
    for n, layers in ((1, "0"), (2, "0,1")):
        for cond in ("clean", "transcoder", "zero_ablation", "mlp_ablation"):
            assert (n, cond, "", "all") in by
        for method in cfg.multilayer.calibrations:
            r = by[(n, "simulated", method, "all")]
            assert r["layers"] == layers and r["fraction"] == 1.0 and r["n_latents"] > 0
        zero = by[(n, "zero_ablation", "", "all")]
        assert zero["delta_zero_mean"] == 0.0
    for r in t:
        assert r["ce_lo"] <= r["ce_mean"] <= r["ce_hi"]
    # the first subset is the single-layer evaluation of the main layer: same CE as the transcoder stage's fit
    fit = store.read_manifest("transcoder", keys["transcoder"])["metrics"]
    assert by[(1, "transcoder", "", "all")]["ce_mean"] == pytest.approx(fit["ce_transcoder"], rel=1e-5)
    assert by[(1, "zero_ablation", "", "all")]["ce_mean"] == pytest.approx(fit["ce_zero_ablation"], rel=1e-5)
    # rewriting a second layer on top of the first changes CE
    assert by[(2, "zero_ablation", "", "all")]["ce_mean"] != by[(1, "zero_ablation", "", "all")]["ce_mean"]
    # the extra layer's stages are ordinary, content-addressed artifacts
    for stage in ("transcoder", "activations", "score", "calibrate"):
        assert store.has_manifest(stage, per[1][stage])
    assert ref.key == keys["multilayer"]
    # the library stage and the flow agree, row for row
    flow = artifacts.read_table(Store(multi_run[0]), "multilayer", keys["multilayer"], "multilayer").to_pylist()
    assert len(flow) == len(t)
    for a, b in zip(t, flow):
        for k in a:
            if isinstance(a[k], float):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9, nan_ok=True), k
            else:
                assert a[k] == b[k], k
    # a second call finds the manifest
    assert stages.run("multilayer", store, cfg, keys).key == ref.key


def test_flow_runs_multilayer_only_when_configured(multi_run, tmp_path, capsys):
    """The rewrite flow with an extra layer (the module's run): the main layer's keys are the micro
    run's, the multilayer stage's artifact is there, and `query` sees the table."""
    from flows.cli import main
    from nlrewrite_core.query import query
    from nlrewrite_core.storage import MANIFEST

    storage, first, result = multi_run
    assert "multilayer" not in first and "multilayer" not in first["keys"]
    assert {k: result["keys"][k] for k in first["keys"]} == first["keys"]
    assert Store(storage).has_manifest("multilayer", result["keys"]["multilayer"])
    assert {(r["n_layers"], r["layers"]) for r in result["multilayer"]} == {(1, "0"), (2, "0,1")}
    _, rows = query(Store(storage), "micro-multi",
                    "select count(*) from multilayer where condition = 'zero_ablation' and delta_zero_mean = 0")
    assert rows[0][0] == 2 * 2  # two subsets x two position sets
    # patch-evaluate on this run needs layer 1's upstream too: without its simulation it refuses, naming it
    copy = copy_run(storage, str(tmp_path / "store"))
    layer1 = multilayer.layer_keys(load_config("micro", overrides=EXTRA))[1]
    Path(Store(copy).artifact_dir("simulate", layer1["simulate"]), MANIFEST).unlink()
    capsys.readouterr()
    assert main(["evaluate", "micro-multi", "--storage", copy]) == 2
    assert f"stage 'simulate' of layer 1 (key {layer1['simulate']}) has no manifest" in capsys.readouterr().err
