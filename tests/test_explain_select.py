"""The explainer's candidate rows selected in DuckDB over the latent cache (explain.max_candidates):
equal to a numpy reference, and with no cap the explanations are those of the former in-memory load."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import moto_s3
from nlrewrite_core import explain as explain_lib
from nlrewrite_core import artifacts, stages
from nlrewrite_core.config import ConfigError, ExplainConfig, load_config
from nlrewrite_core.query import top_activations
from nlrewrite_core.manifest import StageWriter
from nlrewrite_core.storage import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMA = pa.schema([("seq_id", pa.int64()), ("pos", pa.int32()), ("latent", pa.int32()), ("act", pa.float32()),
                    ("split", pa.string())])


def synthetic_cache(act_type: pa.DataType = pa.float32()) -> pa.Table:
    """A sparse cache in the stage's row order (seq_id, pos): explain sequences 0-29, calib 30-39;
    coarse activations (many ties); latent 5 fires only twice, latent 6 never."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(40):
        for p in range(12):
            for lat in rng.choice(5, size=3, replace=False):
                rows.append((s, p, int(lat), float(rng.integers(1, 5)) / 4))
    rows += [(3, 4, 5, 0.5), (8, 1, 5, 0.75)]
    rows.sort(key=lambda r: (r[0], r[1]))
    seq, pos, lat, act = (np.array(c) for c in zip(*rows))
    t = pa.table({"seq_id": seq.astype(np.int64), "pos": pos.astype(np.int32), "latent": lat.astype(np.int32),
                  "act": act.astype(np.float32), "split": np.where(seq < 30, "explain", "calib")}, schema=SCHEMA)
    return t.cast(SCHEMA.set(3, pa.field("act", act_type)))


def write_cache(store: Store, table: pa.Table, key: str = "k") -> str:
    w = StageWriter(store, "activations", key, config={}, upstream={}, version="1")
    w.table("activations", table)
    w.finish()
    return key


def reference(table: pa.Table, split: str, seq_ids: np.ndarray, max_candidates: int) -> dict[str, np.ndarray]:
    """numpy: the split's rows of `seq_ids`, sorted by (latent, act desc, seq_id, pos), the first
    max_candidates of each latent (0: all)."""
    c = {k: table.column(k).to_numpy(zero_copy_only=False) for k in ("seq_id", "pos", "latent", "act", "split")}
    keep = (c["split"] == split) & np.isin(c["seq_id"], seq_ids)
    c = {k: v[keep] for k, v in c.items() if k != "split"}
    c["act"] = c["act"].astype(np.float32)
    order = np.lexsort((c["pos"], c["seq_id"], -c["act"], c["latent"]))
    c = {k: v[order] for k, v in c.items()}
    if max_candidates:
        first = np.searchsorted(c["latent"], c["latent"], side="left")
        rank = np.arange(len(c["latent"])) - first
        c = {k: v[rank < max_candidates] for k, v in c.items()}
    return c


@pytest.mark.parametrize("act_type", [pa.float32(), pa.float16()])
@pytest.mark.parametrize("max_candidates", [0, 1, 4, 1000])
def test_selection_matches_numpy_reference(tmp_path, act_type, max_candidates):
    store = Store(str(tmp_path))
    table = synthetic_cache(act_type)
    key = write_cache(store, table)
    shown, _ = artifacts.explain_halves(np.arange(30))
    got = top_activations(store, key, "explain", shown, max_candidates)
    assert got.schema.names == ["seq_id", "pos", "latent", "act"]
    assert [f.type for f in got.schema] == [pa.int64(), pa.int32(), pa.int32(), pa.float32()]
    ref = reference(table, "explain", shown, max_candidates)
    for k, v in ref.items():
        np.testing.assert_array_equal(got.column(k).to_numpy(), v, err_msg=k)
    counts = np.bincount(got.column("latent").to_numpy(), minlength=7)
    assert counts[6] == 0 and counts[5] == 1  # (3, 4) is on the scoring half; (8, 1) is shown, kept under any cap
    assert set(got.column("seq_id").to_numpy().tolist()) <= set(shown.tolist())
    if max_candidates:
        assert counts.max() <= max_candidates
    if max_candidates == 4:  # the cut falls inside a run of tied activations: broken by (seq_id, pos)
        full = reference(table, "explain", shown, 0)
        lat0 = full["act"][full["latent"] == 0]
        assert lat0[3] == lat0[4]


def test_selection_on_s3_equals_local(tmp_path):
    """The same query over the cache on an S3 root (moto on loopback), read through the store's filesystem."""
    env = {"AWS_ACCESS_KEY_ID": "AKIANLREWRITESELECT0", "AWS_SECRET_ACCESS_KEY": "not-a-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}
    table = synthetic_cache()
    shown, _ = artifacts.explain_halves(np.arange(30))
    local = Store(str(tmp_path))
    want = top_activations(local, write_cache(local, table), "explain", shown, 4)
    with moto_s3(env, ("nlr-select",)) as url:
        s3 = Store("s3://nlr-select/root", endpoint_url=url)
        got = top_activations(s3, write_cache(s3, table), "explain", shown, 4)
    assert len(got) > 0 and got.equals(want)


def test_no_cap_gives_the_former_rows_in_the_explainers_order(tmp_path):
    """With max_candidates=0 the selection is the old in-memory filter's rows; after the explainers'
    stable sort by (latent, -act) both are in the same order (the cache is written in (seq_id, pos)
    order, so the old tie order is (seq_id, pos) too)."""
    store = Store(str(tmp_path))
    table = synthetic_cache()
    key = write_cache(store, table)
    shown, _ = artifacts.explain_halves(np.arange(30))
    old = artifacts.read_table(store, "activations", key, "activations",
                        filters=(pc.field("split") == "explain") & pc.field("seq_id").isin(shown.tolist()))
    new = top_activations(store, key, "explain", shown, 0)

    def explainer_order(t: pa.Table) -> pa.Table:
        t = t.select(["seq_id", "pos", "latent", "act"])
        return t.take(np.lexsort((-t.column("act").to_numpy(), t.column("latent").to_numpy())))

    assert explainer_order(new).equals(explainer_order(old))


def test_config_field_keeps_default_keys_and_is_checked():
    assert "max_candidates" not in load_config("micro").model_dump()["explain"]
    assert load_config("paper-shape").explain.max_candidates == 2000
    assert ExplainConfig().max_candidates == 0
    with pytest.raises(ConfigError, match="max_candidates"):
        load_config("micro", overrides={"explain": {"max_candidates": 2, "min_activations": 3}})
    with pytest.raises(ConfigError, match="max_candidates"):
        load_config("micro", overrides={"explain": {"max_candidates": -1}})


class EchoLLM:
    """A stand-in explainer LLM whose answer is a digest of the prompt: equal answers, equal prompts."""

    name, backend = "echo", "echo"
    cfg = SimpleNamespace(temperature=0.0, model="echo")

    def __init__(self):
        self.last_tokens: list[tuple[int, int]] = []

    def generate(self, prompts, temperature=None, seed=0):
        self.last_tokens = [(1, 1)] * len(prompts)
        return [f"[EXPLANATION]: p{hashlib.sha256(repr(p).encode()).hexdigest()[:16]}" for p in prompts]


def test_micro_stage_explanations_unchanged_without_cap(small_upstream, tmp_path):
    """run_explain on a micro store (the session's small one, copied): with no cap, the ngram (stage) and
    llm/contrastive (function) explanations equal those computed from the rows the stage used to load; a
    cap still explains."""
    from conftest import SMALL, copy_run

    cfg = load_config("micro", overrides=SMALL)
    keys = stages.plan(cfg)
    assert keys == small_upstream[1]
    store = Store(copy_run(small_upstream[0], str(tmp_path / "store")))
    stages.run("explain", store, cfg, keys)  # done by the fixture: found by its manifest
    got = artifacts.read_table(store, "explain", keys["explain"], "explanations")

    num_latents = artifacts.num_latents(store, keys)
    seq_ids, tokens = artifacts.load_tokens(store, keys, ("explain",))
    shown, _ = artifacts.explain_halves(seq_ids)
    tokenizer = artifacts.load_tokenizer(store, keys)
    by_seq = {int(s): tokens[i] for i, s in enumerate(seq_ids)}

    def args(a: pa.Table, ecfg: ExplainConfig) -> tuple:
        return (a.column("seq_id").to_numpy(), a.column("pos").to_numpy(), a.column("latent").to_numpy(),
                a.column("act").to_numpy().astype(np.float32), by_seq, lambda t: tokenizer.decode([t]),
                lambda ids: tokenizer.decode(ids), num_latents, ecfg)

    old = artifacts.read_table(store, "activations", keys["activations"], "activations",
                        filters=(pc.field("split") == "explain") & pc.field("seq_id").isin(shown.tolist()))
    new = top_activations(store, keys["activations"], "explain", shown, 0)
    assert len(new) == len(old) > 0
    assert got.equals(explain_lib.ngram_explanations(*args(old, cfg.explain)))
    assert got.column("status").to_pylist().count("explained") > 0

    llm_cfg = cfg.explain.model_copy(update={"method": "contrastive", "n_examples": 4, "window": 8, "n_contrast": 2})
    neighbors = {lat: [(lat + 1) % num_latents, (lat + 5) % num_latents] for lat in range(num_latents)}
    for nb in (None, neighbors):
        want = explain_lib.llm_explanations(*args(old, llm_cfg), EchoLLM(), neighbors=nb)
        assert explain_lib.llm_explanations(*args(new, llm_cfg), EchoLLM(), neighbors=nb).equals(want)

    capped = load_config("micro", overrides={**SMALL, "explain": {"max_candidates": 3}})
    keys_c = stages.plan(capped)
    assert keys_c["activations"] == keys["activations"] and keys_c["explain"] != keys["explain"]
    stages.run("explain", store, capped, keys_c)
    e = artifacts.read_table(store, "explain", keys_c["explain"], "explanations").to_pylist()
    assert [r["status"] for r in e] == got.column("status").to_pylist()  # min_activations 1: same live latents
    assert max(r["n_examples"] for r in e) <= 3
    top = top_activations(store, keys["activations"], "explain", shown, 3)
    assert np.bincount(top.column("latent").to_numpy()).max() <= 3
