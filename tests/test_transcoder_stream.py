"""Transcoder training that streams: MLP inputs/outputs recomputed from the subject one shuffle buffer
at a time, checkpoints in sparsify's layout, exact resume after a SIGKILL, and peak RSS that does not
grow with the token budget."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nlrewrite_core import subject, transcoder, transcoder_train
from nlrewrite_core.config import SubjectConfig, TranscoderConfig
from nlrewrite_core.storage import Store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 200, 16
CFG = TranscoderConfig(num_latents=64, k=4, steps=40, batch_tokens=64, lr=1e-3, buffer_tokens=256,
                       checkpoint_every=10, max_train_tokens=1000)


def tiny_subject(hidden: int = 16, layers: int = 2) -> torch.nn.Module:
    return subject.build_model(SubjectConfig(hidden_size=hidden, num_layers=layers, num_heads=2,
                                             intermediate_size=4 * hidden), VOCAB, SEQ)


def tokens(n_seq: int = 60, seed: int = 0, seq: int = SEQ) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n_seq, seq), dtype=np.int32)


def test_stream_is_a_function_of_the_step() -> None:
    model = tiny_subject()
    train, _ = transcoder_train.held_out_sequences(60, SEQ, 0)
    s = transcoder_train.BufferStream(model, 1, tokens(), train, CFG, 8, "cpu")
    assert s.seqs_per_buffer == 16 and s.batch == 64 and s.batches_per_buffer == 4
    first = [b for _, b in zip(range(12), s.batches(0))]
    later = [b for _, b in zip(range(5), s.batches(7))]
    for (x0, y0), (x1, y1) in zip(first[7:], later):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # a buffer holds MLP inputs/outputs of whole train sequences: every row is one of theirs
    X, _ = transcoder.collect_mlp_io(model, 1, tokens()[train], 8)
    rows = {r.numpy().tobytes() for r in X}
    assert all(r.numpy().tobytes() in rows for x, _ in first for r in x)
    # the forward stops after the hooked MLP and gives what a full forward gives
    Xf, Yf = transcoder.collect_mlp_io(model, 1, tokens()[:4], 2)
    with torch.no_grad():
        torch.testing.assert_close(subject.mlp_module(model, 1)(Xf), Yf)


def test_streaming_matches_in_memory_training() -> None:
    """Same initialisation, schedule and loss as the in-memory reference: comparable fits."""
    model = tiny_subject()
    toks = tokens(200)
    cfg = CFG.model_copy(update={"steps": 150, "checkpoint_every": 0, "buffer_tokens": 1024})
    sae, m = transcoder_train.train_streaming(model, 1, toks, cfg, 16)
    X, Y = transcoder.collect_mlp_io(model, 1, toks, 16)
    _, ref = transcoder_train.train_transcoder(X, Y, cfg)
    assert m["steps"] == 150 and m["resumed_from"] == 0 and m["held_out_tokens"] >= 320
    assert m["fvu"] < 0.5 and abs(m["fvu"] - ref["fvu"]) < 0.15 * ref["fvu"]
    # init: b_dec is the mean output of the training tokens (sparsify's rule), before any step
    fresh = transcoder_train.new_transcoder(16, cfg)
    train, _ = transcoder_train.held_out_sequences(200, SEQ, cfg.seed)
    mx, my = transcoder_train.mean_mlp_io(model, 1, toks[train], 16, "cpu")
    transcoder_train.init_biases(fresh, mx[None], my[None])
    torch.testing.assert_close(fresh.b_dec, Y.reshape(200, SEQ, -1)[train].reshape(-1, 16).mean(0), atol=1e-5, rtol=0)


RSS_CHILD = """
import json, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_transcoder_stream import tiny_subject, tokens
from nlrewrite_core import transcoder_train
from nlrewrite_core.config import TranscoderConfig
n_tokens = int(sys.argv[1])
toks = tokens(n_tokens // 64, seq=64)
cfg = TranscoderConfig(num_latents=256, k=8, steps=20, batch_tokens=512, buffer_tokens=8192, checkpoint_every=0,
                       max_train_tokens=n_tokens)
_, m = transcoder_train.train_streaming(tiny_subject(hidden=64, layers=1), 0, toks, cfg, 64)
print(json.dumps({{"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "fvu": m["fvu"],
                  "train_tokens": m["train_tokens"]}}))
"""


def peak_rss(n_tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = RSS_CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", code, str(n_tokens)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_token_budget() -> None:
    """800K vs 160K training tokens (d=64): holding their MLP inputs and outputs would cost 8 bytes x 64
    per token more (~310 MB); streaming stays within a few MB (the 4-byte token ids)."""
    small, big = peak_rss(160_000), peak_rss(800_000)
    assert big["train_tokens"] > 4 * small["train_tokens"]
    growth_mb = (big["maxrss_kb"] - small["maxrss_kb"]) / 1024
    in_memory_mb = (big["train_tokens"] - small["train_tokens"]) * 64 * 2 * 4 / 2**20
    print(f"peak RSS {small['maxrss_kb'] / 1024:.0f} MB at 160K tokens, {big['maxrss_kb'] / 1024:.0f} MB at 800K "
          f"(growth {growth_mb:.1f} MB; in memory the activations alone would add {in_memory_mb:.0f} MB)")
    assert growth_mb < 32 and growth_mb < 0.1 * in_memory_mb


STAGE_CHILD = """
import os, signal, sys
import numpy as np, torch
torch.set_num_threads(1)
from nlrewrite_core import stages, transcoder_train
from nlrewrite_core.config import load_config
from nlrewrite_core.storage import Store

class DieAfter(transcoder_train.Checkpoints):
    def save(self, sae, opt, state):
        super().save(sae, opt, state)
        if state.step >= {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

transcoder_train.Checkpoints = DieAfter  # the stage's own checkpoints: killed right after the one at step kill_at
cfg = load_config("micro", overrides={overrides!r})
stages.run("transcoder", Store({store!r}), cfg, stages.plan(cfg))
"""


def test_stage_resumes_from_its_checkpoint(micro_run, tmp_path) -> None:
    """The library-layer crash-resume test: run_transcoder SIGKILLed after its second checkpoint (step 40,
    which replaced step 20's) leaves sparsify's layout; the rerun resumes there (the checkpoint survives the
    stage writer's clean-up of a manifest-less directory), removes the checkpoints when done, and gives the
    transcoder of an uninterrupted run bit for bit. Corpus and subject are the micro run's (same keys)."""
    from nlrewrite_core import stages
    from nlrewrite_core.config import load_config

    from conftest import copy_artifacts

    overrides = {"transcoder": {"checkpoint_every": 20}}
    cfg, store = load_config("micro", overrides=overrides), Store(str(tmp_path / "store"))
    keys = stages.plan(cfg)
    copy_artifacts(micro_run[0], str(tmp_path / "store"), keys, ("corpus", "subject"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = STAGE_CHILD.format(overrides=overrides, store=str(tmp_path / "store"), kill_at=40)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = store.artifact_dir("transcoder", keys["transcoder"], "checkpoints")
    hookpoint = f"layers.{cfg.transcoder.layer}.mlp"
    assert not store.has_manifest("transcoder", keys["transcoder"])
    # sparsify's layout; the step-20 checkpoint was replaced by step 40's
    assert store.listdir(ckpt) == ["latest.json", "step-40"]
    assert transcoder_train.Checkpoints(store, ckpt, hookpoint).latest() == 40
    assert json.loads(store.read_bytes(f"{ckpt}/latest.json")) == {"step": 40}
    assert store.listdir(f"{ckpt}/step-40") == [hookpoint, "optimizer_0.pt", "rank_0_state.pt", "state.pt"]
    assert store.listdir(f"{ckpt}/step-40/{hookpoint}") == ["cfg.json", "sae.safetensors"]
    mid = transcoder.load_transcoder(Path(ckpt) / "step-40" / hookpoint)
    assert mid.cfg.transcode and mid.num_latents == cfg.transcoder.num_latents

    stages.run("transcoder", store, cfg, keys)
    m = store.read_manifest("transcoder", keys["transcoder"])["metrics"]
    assert m["resumed_from"] == 40 and m["steps"] == cfg.transcoder.steps and np.isfinite(m["eval_fvu"])
    assert "checkpoints" not in store.listdir(store.artifact_dir("transcoder", keys["transcoder"]))
    # the same transcoder, byte for byte, and the same fit, as an uninterrupted run's
    other = Store(str(tmp_path / "other"))
    copy_artifacts(micro_run[0], str(tmp_path / "other"), keys, ("corpus", "subject"))
    stages.run("transcoder", other, cfg, keys)

    def sae_sha(st: Store) -> str:
        files = st.read_manifest("transcoder", keys["transcoder"])["files"]
        return next(f["sha256"] for f in files if f["name"] == "sae/sae.safetensors")

    assert sae_sha(store) == sae_sha(other)
    m2 = other.read_manifest("transcoder", keys["transcoder"])["metrics"]
    assert m2["resumed_from"] == 0
    for k in ("fvu", "train_fvu", "eval_fvu", "ce_transcoder", "train_tokens"):
        assert m[k] == m2[k], k
