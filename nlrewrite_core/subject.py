"""Subject stage: the transformer whose MLP gets rewritten.

The tiny preset trains a small GPT-NeoX (Pythia architecture) from scratch, deterministically;
the pythia-160m preset loads a model from the hub. Helpers measure per-position next-token
cross-entropy and swap an MLP's output for any function of its input (a forward hook).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedModel

from nlrewrite_core import progress
from nlrewrite_core.config import SubjectConfig

log = logging.getLogger(__name__)

MlpFn = Callable[[torch.Tensor], torch.Tensor]
"""Replacement for an MLP: maps its input [batch, seq, d] to an output [batch, seq, d]."""


# ---------------------------------------------------------------------------------- model


def model_config(cfg: SubjectConfig, vocab_size: int, max_len: int) -> GPTNeoXConfig:
    """A Pythia-style GPT-NeoX config (parallel residual, 25% rotary, untied embeddings, no dropout)."""
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act="gelu",
        max_position_embeddings=max_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )


def build_model(cfg: SubjectConfig, vocab_size: int, max_len: int) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX (Pythia architecture); the same seed gives the same weights."""
    torch.manual_seed(cfg.seed)
    model = GPTNeoXForCausalLM(model_config(cfg, vocab_size, max_len))
    return model.eval()


def load_hub_model(hub_id: str, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM (e.g. ``EleutherAI/pythia-160m``) from the hub or a local path, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype)
    return to_device(model, device).eval()


def to_device(model: PreTrainedModel, device: str | torch.device) -> PreTrainedModel:
    """``model.to(device)``: the same model (a module moves in place), typed as what it is."""
    # transformers declares PreTrainedModel.to with @wraps(Module.to), which mypy reads as unbound
    return model.to(device)  # type: ignore[arg-type]


def num_params(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------- training


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup to ``peak_lr`` then cosine decay to 10% of it."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_order(n_seq: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Sequence indices of every step, shape (steps, batch_size): shuffled epochs, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    need = steps * batch_size
    epochs = [rng.permutation(n_seq) for _ in range(math.ceil(need / n_seq))]
    return np.concatenate(epochs)[:need].reshape(steps, batch_size)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a [batch, seq] token tensor."""
    logits = model(input_ids=batch).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def train_subject(model: torch.nn.Module, train_tokens: np.ndarray, cfg: SubjectConfig,
                  device: str | torch.device = "cpu", log_every: int = 50) -> dict[str, float]:
    """Train ``model`` in place on ``train_tokens`` [n_seq, seq_len] for ``cfg.steps`` AdamW steps.

    Deterministic: a fixed seed fixes the batch order, warmup (5% of steps) + cosine schedule,
    gradient clipping at 1.0. Logs loss and tokens/s. Returns final_train_loss (mean of the last
    10% of steps), steps, tokens, tokens_per_s, wall_s.
    """
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    tokens = torch.as_tensor(np.asarray(train_tokens, dtype=np.int64))
    order = batch_order(len(tokens), cfg.steps, cfg.batch_size, cfg.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    warmup = max(1, cfg.steps // 20)
    losses: list[float] = []
    t0 = last_t = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, warmup)
        batch = tokens[order[step]].to(device)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        progress.advance("subject", step + 1, cfg.steps, "steps")
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            now = time.perf_counter()
            n_steps = (step % log_every) + 1
            rate = n_steps * batch.numel() / max(now - last_t, 1e-9)
            log.info("subject step %d/%d loss %.4f lr %.2e %.0f tokens/s",
                     step + 1, cfg.steps, losses[-1], opt.param_groups[0]["lr"], rate)
            last_t = now
    wall = time.perf_counter() - t0
    model.eval()
    tail = losses[-max(1, cfg.steps // 10):]
    n_tokens = cfg.steps * cfg.batch_size * tokens.shape[1]
    return {"final_train_loss": float(np.mean(tail)), "steps": cfg.steps, "tokens": n_tokens,
            "tokens_per_s": n_tokens / wall, "wall_s": wall}


# ------------------------------------------------------------------------------ MLP hooks


def blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a GPT-NeoX model (``model.gpt_neox.layers``)."""
    return cast(torch.nn.ModuleList, model.get_submodule("gpt_neox.layers"))


def mlp_module(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """The MLP module of transformer block ``layer`` of a GPT-NeoX model."""
    layers = blocks(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} is out of range: the model has {len(layers)} layers")
    return layers[layer].get_submodule("mlp")


@contextlib.contextmanager
def replace_mlp(model: torch.nn.Module, layer: int, fn: MlpFn, position: int | None = None) -> Iterator[None]:
    """Within the block, the MLP at ``layer`` returns ``fn(mlp_input)`` instead of its own output;
    with ``position``, at that sequence position only (``fn`` sees the [batch, 1, d] input there)
    and the MLP's own output everywhere else.

    Implemented as a forward hook (the MLP still runs); the hook is removed on exit, also when an
    exception is raised.
    """
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if position is None:
            return fn(args[0]).to(output.dtype)
        out = output.clone()
        out[:, position:position + 1] = fn(args[0][:, position:position + 1]).to(output.dtype)
        return out

    handle = mlp_module(model, layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def zero_mlp(x: torch.Tensor) -> torch.Tensor:
    """An MLP replacement that outputs zeros."""
    return torch.zeros_like(x)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def token_ce(model: torch.nn.Module, tokens: np.ndarray, batch_size: int,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """Per-position next-token cross-entropy, float32 of shape (n_seq, seq_len - 1), on CPU.

    Respects any active ``replace_mlp`` context.
    """
    data = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    out = []
    for start in range(0, len(data), batch_size):
        batch = data[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        ce = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        out.append(ce.view(batch.shape[0], -1).cpu())
    if not out:
        return torch.zeros(0, max(0, data.shape[1] - 1) if data.ndim == 2 else 0)
    return torch.cat(out)


def unigram_ce(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Mean CE of an add-one smoothed unigram model fit on train, on the eval targets (positions 1..)."""
    counts = np.bincount(np.asarray(train_tokens).ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    targets = np.asarray(eval_tokens)
    targets = targets[:, 1:] if targets.ndim == 2 else targets
    return float(-logp[targets.ravel()].mean())


def mlp_ablation_costs(model: torch.nn.Module, eval_tokens: np.ndarray, batch_size: int,
                       device: str | torch.device = "cpu") -> list[float]:
    """Mean eval CE with each layer's MLP output zeroed, one entry per layer."""
    costs = []
    for layer in range(len(blocks(model))):
        with replace_mlp(model, layer, zero_mlp):
            costs.append(float(token_ce(model, eval_tokens, batch_size, device).mean()))
    return costs
