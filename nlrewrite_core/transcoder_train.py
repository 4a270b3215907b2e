"""Transcoder training: a TopK skip transcoder (sparsify's ``SparseCoder``) fit to one MLP.

Our own deterministic Adam loop, initialised like sparsify's Trainer, on MLP inputs/outputs streamed
from the subject through a bounded shuffle buffer (``train_streaming``; ``train_transcoder`` is the
in-memory reference), with resumable checkpoints in sparsify's layout (``Checkpoints``). The
model-side code (MLP input/output collection, the transcoder's forward, fit metrics, CE, saving and
loading checkpoints) is in nlrewrite_core.transcoder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

with contextlib.redirect_stdout(io.StringIO()):  # sparsify prints a Triton notice on import
    from sparsify import SparseCoder, SparseCoderConfig

from nlrewrite_core import progress
from nlrewrite_core.config import TranscoderConfig
from nlrewrite_core.transcoder import autocast, collect_mlp_io, evaluate_fit, iter_mlp_io

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DEAD_AFTER_TOKENS = 100_000
"""During training, a latent that has not fired for this many tokens counts as dead (AuxK loss)."""

HELD_OUT_FRACTION = 0.1
"""Fraction of the cached tokens held out to measure FVU and dead latents (at most MAX_HELD_OUT)."""

MAX_HELD_OUT = 16_384
"""Cap on held-out tokens."""


def default_lr(num_latents: int) -> float:
    """sparsify's Adam learning-rate rule: 2e-4 / sqrt(num_latents / 2**14)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def new_transcoder(d_in: int, cfg: TranscoderConfig) -> SparseCoder:
    """A fresh TopK skip transcoder (sparsify's init: default Linear encoder, W_dec = W_skip = 0)."""
    torch.manual_seed(cfg.seed)
    sc_cfg = SparseCoderConfig(num_latents=cfg.num_latents, k=cfg.k, transcode=True,
                               skip_connection=True, normalize_decoder=False)
    return SparseCoder(d_in, sc_cfg, device="cpu", dtype=torch.float32)


@torch.no_grad()
def init_biases(sae: SparseCoder, X: torch.Tensor, Y: torch.Tensor) -> None:
    """sparsify's Trainer init: ``encoder.bias = -mean(x) @ W_enc.T`` and ``b_dec = mean(y)``."""
    sae.encoder.bias.data = -X.mean(0) @ sae.encoder.weight.data.T
    sae.b_dec.data = Y.mean(0).clone()


def held_out_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held_out) of a seeded random split of n tokens."""
    n_val = min(MAX_HELD_OUT, max(1, int(n * HELD_OUT_FRACTION)))
    perm = torch.as_tensor(np.random.default_rng(seed).permutation(n))
    return perm[n_val:], perm[:n_val]


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then linear decay to 0 (sparsify's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class TrainState:
    """Where training stands after ``step`` steps (what a checkpoint restores besides weights and Adam)."""

    step: int
    since_fired: torch.Tensor
    """Tokens since each latent last fired (sparsify's num_tokens_since_fired)."""
    fvu_tail: list[float] = field(default_factory=list)
    """Training FVU of the last steps (the mean of the last 10% of steps is reported)."""


def _optimizer(sae: SparseCoder, cfg: TranscoderConfig) -> tuple[torch.optim.Adam, float]:
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.num_latents)
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8), lr


def _train_steps(sae: SparseCoder, opt: torch.optim.Adam, lr: float, cfg: TranscoderConfig, state: TrainState,
                 batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: str | torch.device = "cpu",
                 on_step: Callable[[TrainState], None] | None = None, log_every: int = 250) -> TrainState:
    """Adam steps ``state.step`` .. ``cfg.steps - 1`` on ``batches``: linear warmup (10% of steps) and
    linear decay, loss FVU + auxk_alpha * AuxK (latents silent for ``DEAD_AFTER_TOKENS`` count as
    dead), bf16 autocast on CUDA. ``on_step`` sees the state after every step (checkpoints)."""
    warmup = max(1, cfg.steps // 10)
    tail = max(1, cfg.steps // 10)
    for step in range(state.step, cfg.steps):
        x, y = next(batches)
        for group in opt.param_groups:
            group["lr"] = lr * linear_warmup_decay(step, cfg.steps, warmup)
        dead_mask = state.since_fired > DEAD_AFTER_TOKENS if cfg.auxk_alpha > 0 else None
        with autocast(device):
            out = sae(x, y, dead_mask=dead_mask)
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=state.since_fired.device)
            fired[out.latent_indices[out.latent_acts > 0]] = True
            state.since_fired += len(x)
            state.since_fired[fired] = 0
        state.fvu_tail = (state.fvu_tail + [float(out.fvu.detach())])[-tail:]
        state.step = step + 1
        progress.advance("transcoder", state.step, cfg.steps, "steps")
        if state.step % log_every == 0 or state.step == cfg.steps:
            log.info("transcoder step %d/%d fvu %.4f auxk %.4f dead %d", state.step, cfg.steps, state.fvu_tail[-1],
                     float(out.auxk_loss.detach()), int((state.since_fired > DEAD_AFTER_TOKENS).sum()))
        if on_step is not None:
            on_step(state)
    return state


def train_transcoder(X: torch.Tensor, Y: torch.Tensor, cfg: TranscoderConfig,
                     log_every: int = 250) -> tuple[SparseCoder, dict[str, float]]:
    """Train a TopK skip transcoder on MLP inputs X and outputs Y held in memory ([n_tokens, d] each).

    The in-memory reference (tests, benchmarks); the stage streams (``train_streaming``). Deterministic
    (seeded init, split and batch order). A random ``HELD_OUT_FRACTION`` of the tokens is held out; the
    schedule and loss are ``_train_steps``'. Returns the transcoder (eval mode) and metrics: fvu and
    dead_fraction on held-out tokens, train_fvu (last 10% of steps), steps, lr, train_tokens,
    held_out_tokens, wall_s.
    """
    X = X.float().contiguous()
    Y = Y.float().contiguous()
    t0 = time.perf_counter()
    train_idx, val_idx = held_out_split(len(X), cfg.seed)
    X_tr, Y_tr = X[train_idx], Y[train_idx]
    sae = new_transcoder(X.shape[1], cfg)
    init_biases(sae, X_tr, Y_tr)
    opt, lr = _optimizer(sae, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_tokens, len(X_tr))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            perm = torch.randperm(len(X_tr), generator=gen)
            for cursor in range(0, len(perm) - batch + 1, batch):
                idx = perm[cursor:cursor + batch]
                yield X_tr[idx], Y_tr[idx]

    state = _train_steps(sae, opt, lr, cfg, TrainState(0, torch.zeros(sae.num_latents, dtype=torch.long)),
                         batches(), log_every=log_every)
    sae.eval()
    metrics = evaluate_fit(sae, X[val_idx], Y[val_idx])
    metrics.update({
        "train_fvu": float(np.mean(state.fvu_tail)),
        "steps": cfg.steps, "lr": lr, "train_tokens": len(X_tr), "held_out_tokens": len(val_idx),
        "wall_s": time.perf_counter() - t0,
    })
    return sae, metrics


# ------------------------------------------------------------------------------ streaming
#
# The stage trains on MLP inputs/outputs recomputed from the subject one shuffle buffer at a time,
# never holding the whole set. sparsify's Trainer (EleutherAI/sparsify, trainer.py `fit`) also streams:
# it runs the model on each batch of sequences and trains on that batch's activations in a forward
# hook, in dataset order. We differ on purpose in three ways: (1) the buffer spans `buffer_tokens`
# tokens from sequences drawn in a seeded random order, shuffled at the token level, so a batch mixes
# ~buffer/seq_len sequences rather than the few of one forward pass (closer to the i.i.d. batches of
# our in-memory reference); (2) the forward stops after the hooked MLP; (3) biases are initialised
# from the mean over all training tokens (one extra pass, as our in-memory reference did) rather
# than from sparsify's first batch. Schedule, loss, AuxK bookkeeping and Adam are the reference's.
# The stream is a pure function of (seed, step), so a run resumed from a checkpoint at step s sees
# exactly the batches an uninterrupted run sees after step s.


def held_out_sequences(n_seq: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) sequence indices: a seeded random set of whole sequences holding at least
    min(MAX_HELD_OUT, HELD_OUT_FRACTION of the tokens) tokens is held out for the fit metrics."""
    if n_seq < 2:
        raise ValueError(f"transcoder training needs at least 2 train sequences, got {n_seq}: raise "
                         "transcoder.max_train_tokens or give the corpus more text")
    n_val = min(MAX_HELD_OUT, max(1, int(n_seq * seq_len * HELD_OUT_FRACTION)))
    n_val_seq = min(n_seq - 1, max(1, math.ceil(n_val / seq_len)))
    perm = np.random.default_rng(seed).permutation(n_seq)
    return np.sort(perm[n_val_seq:]), np.sort(perm[:n_val_seq])


class BufferStream:
    """Training batches from a shuffle buffer refilled from the subject.

    The stream of sequences is epochs of the train sequences, each epoch in a seeded random order;
    buffer c holds stream positions [c*S, (c+1)*S) (S = buffer_tokens // seq_len sequences, at most one
    epoch), whose MLP inputs/outputs are computed, permuted with a generator seeded by (seed, c), and cut
    into ``batches_per_buffer`` batches. Step s is batch s % batches_per_buffer of buffer
    s // batches_per_buffer: any step's batch is recomputable, which makes resuming exact.
    """

    def __init__(self, model: torch.nn.Module, layer: int, tokens: np.ndarray, train_seqs: np.ndarray,
                 cfg: TranscoderConfig, forward_batch: int, device: str | torch.device):
        self.model, self.layer, self.tokens, self.train_seqs = model, layer, tokens, train_seqs
        self.cfg, self.forward_batch, self.device = cfg, forward_batch, device
        seq_len = tokens.shape[1]
        self.seqs_per_buffer = max(1, min(len(train_seqs), cfg.buffer_tokens // seq_len))
        buffer_tokens = self.seqs_per_buffer * seq_len
        self.batch = min(cfg.batch_tokens, buffer_tokens)
        self.batches_per_buffer = buffer_tokens // self.batch
        self._epoch: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_seqs))
            self._epoch = (epoch, self.train_seqs[perm])
        return self._epoch[1]

    def buffer(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shuffled MLP inputs/outputs of buffer c (on the device)."""
        n = len(self.train_seqs)
        pos = np.arange(c * self.seqs_per_buffer, (c + 1) * self.seqs_per_buffer)
        seqs = np.array([self._order(int(p // n))[p % n] for p in pos])
        xs, ys = zip(*iter_mlp_io(self.model, self.layer, self.tokens[seqs], self.forward_batch, self.device))
        X, Y = torch.cat(xs), torch.cat(ys)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + c)
        perm = torch.randperm(len(X), generator=gen).to(X.device)
        return X[perm], Y[perm]

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of steps ``start_step``, ``start_step + 1``, ... (endless)."""
        c, j = divmod(start_step, self.batches_per_buffer)
        while True:
            X, Y = self.buffer(c)
            for i in range(j, self.batches_per_buffer):
                yield X[i * self.batch:(i + 1) * self.batch], Y[i * self.batch:(i + 1) * self.batch]
            del X, Y
            c, j = c + 1, 0


@torch.no_grad()
def mean_mlp_io(model: torch.nn.Module, layer: int, tokens: np.ndarray, forward_batch: int,
                device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean MLP input and output over all tokens (float64 sums, one streamed pass)."""
    sx: torch.Tensor | None = None
    sy: torch.Tensor | None = None
    n = 0
    for x, y in iter_mlp_io(model, layer, tokens, forward_batch, device):
        bx, by = x.double().sum(0), y.double().sum(0)
        sx, sy = (bx, by) if sx is None or sy is None else (sx + bx, sy + by)
        n += len(x)
    if sx is None or sy is None:
        raise ValueError("mean_mlp_io: no tokens")
    return (sx / n).float(), (sy / n).float()


class Checkpoints:
    """Training checkpoints in sparsify's layout under ``root`` of a store-like object (``Store``:
    read_bytes, write_bytes, exists, remove_dir): ``step-<n>/`` holds ``<hookpoint>/cfg.json`` +
    ``sae.safetensors``, ``optimizer_0.pt``, ``state.pt`` (global_step) and ``rank_0_state.pt``
    (num_tokens_since_fired, keyed by hookpoint); ``latest.json``, written last, names the newest
    complete one (older ones are then removed)."""

    def __init__(self, store: Any, root: str, hookpoint: str):
        self.store, self.root, self.hookpoint = store, root.rstrip("/"), hookpoint

    def save(self, sae: SparseCoder, opt: torch.optim.Adam, state: TrainState) -> None:
        d = f"{self.root}/step-{state.step}"
        with tempfile.TemporaryDirectory() as tmp:
            sae.save_to_disk(Path(tmp) / self.hookpoint)
            for f in sorted((Path(tmp) / self.hookpoint).iterdir()):
                self.store.write_bytes(f"{d}/{self.hookpoint}/{f.name}", f.read_bytes())
        self.store.write_bytes(f"{d}/optimizer_0.pt", _torch_bytes(opt.state_dict()))
        self.store.write_bytes(f"{d}/state.pt", _torch_bytes({"global_step": state.step, "fvu_tail": state.fvu_tail}))
        self.store.write_bytes(f"{d}/rank_0_state.pt", _torch_bytes(
            {"num_tokens_since_fired": {self.hookpoint: state.since_fired.cpu()}}))
        previous = self.latest()
        self.store.write_bytes(f"{self.root}/latest.json", json.dumps({"step": state.step}).encode())
        if previous is not None and previous != state.step:
            self.store.remove_dir(f"{self.root}/step-{previous}")
        log.info("transcoder: checkpoint at step %d", state.step)

    def latest(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        path = f"{self.root}/latest.json"
        return int(json.loads(self.store.read_bytes(path))["step"]) if self.store.exists(path) else None

    def restore(self, sae: SparseCoder, opt: torch.optim.Adam, device: str | torch.device) -> TrainState | None:
        """Load the newest checkpoint into ``sae`` and ``opt``; its state, or None when there is none."""
        step = self.latest()
        if step is None:
            return None
        d = f"{self.root}/step-{step}"
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("cfg.json", "sae.safetensors"):
                (Path(tmp) / name).write_bytes(self.store.read_bytes(f"{d}/{self.hookpoint}/{name}"))
            loaded = SparseCoder.load_from_disk(tmp, device=device)
        sae.load_state_dict(loaded.state_dict())
        # On CPU: load_state_dict moves the moments to the parameters' device and keeps Adam's step
        # counters on the CPU, as a non-capturable Adam needs.
        opt.load_state_dict(_torch_load(self.store.read_bytes(f"{d}/optimizer_0.pt"), "cpu"))
        meta = _torch_load(self.store.read_bytes(f"{d}/state.pt"), "cpu")
        fired = _torch_load(self.store.read_bytes(f"{d}/rank_0_state.pt"), device)["num_tokens_since_fired"]
        log.info("transcoder: resuming from the checkpoint at step %d", step)
        return TrainState(int(meta["global_step"]), fired[self.hookpoint], list(meta["fvu_tail"]))

    def clear(self) -> None:
        self.store.remove_dir(self.root)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(data: bytes, device: str | torch.device) -> Any:
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def train_streaming(model: PreTrainedModel, layer: int, tokens: np.ndarray, cfg: TranscoderConfig,
                    forward_batch: int, device: str | torch.device = "cpu", checkpoints: Checkpoints | None = None,
                    log_every: int = 250) -> tuple[SparseCoder, dict[str, float]]:
    """Train a TopK skip transcoder on the subject's MLP at ``layer`` over ``tokens`` ([n_seq, seq_len]),
    streaming its inputs/outputs through a ``BufferStream`` (memory: the buffer, not the token budget).

    Whole sequences are held out (``held_out_sequences``) for the fit metrics; initialisation is
    sparsify's (``init_biases`` from the mean over the training tokens); schedule and loss are
    ``_train_steps``'. With ``checkpoints``, the state is saved every ``cfg.checkpoint_every`` steps and
    a run resumes from the newest checkpoint. Returns the transcoder (eval mode) and the metrics of
    ``train_transcoder`` plus resumed_from and buffer_tokens.
    """
    t0 = time.perf_counter()
    train_seqs, val_seqs = held_out_sequences(len(tokens), tokens.shape[1], cfg.seed)
    sae = new_transcoder(model.config.hidden_size, cfg).to(device)
    opt, lr = _optimizer(sae, cfg)
    state = checkpoints.restore(sae, opt, device) if checkpoints is not None else None
    resumed_from = state.step if state is not None else 0
    if state is None:
        mx, my = mean_mlp_io(model, layer, tokens[train_seqs], forward_batch, device)
        init_biases(sae, mx[None].to(device), my[None].to(device))
        state = TrainState(0, torch.zeros(sae.num_latents, dtype=torch.long, device=device))
    stream = BufferStream(model, layer, tokens, train_seqs, cfg, forward_batch, device)

    def on_step(st: TrainState) -> None:
        if checkpoints is not None and cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 \
                and st.step < cfg.steps:
            checkpoints.save(sae, opt, st)

    state = _train_steps(sae, opt, lr, cfg, state, stream.batches(state.step), device, on_step, log_every)
    sae.eval()
    Xv, Yv = collect_mlp_io(model, layer, tokens[val_seqs], forward_batch, device)
    metrics = evaluate_fit(sae, Xv, Yv)
    metrics.update({
        "train_fvu": float(np.mean(state.fvu_tail)), "steps": cfg.steps, "lr": lr,
        "train_tokens": int(len(train_seqs) * tokens.shape[1]), "held_out_tokens": len(Xv),
        "buffer_tokens": stream.seqs_per_buffer * tokens.shape[1], "resumed_from": resumed_from,
        "wall_s": time.perf_counter() - t0,
    })
    return sae, metrics
