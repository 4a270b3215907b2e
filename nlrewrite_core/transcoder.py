"""Transcoder stage: a TopK skip transcoder (sparsify's ``SparseCoder``) that replaces one MLP.

The transcoder maps the MLP's input x to ``decode(topk(relu(W_enc x + b_enc))) + b_dec + W_skip x``
(sparsify's formula for transcoders: no b_dec subtraction before encoding). Training is our own
short deterministic Adam loop on cached MLP inputs/outputs, initialised like sparsify's Trainer.
Checkpoints use sparsify's format (``cfg.json`` + ``sae.safetensors``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

with contextlib.redirect_stdout(io.StringIO()):  # sparsify prints a Triton notice on import
    from sparsify import SparseCoder, SparseCoderConfig

from nlrewrite_core.config import ConfigError, TranscoderConfig
from nlrewrite_core.subject import MlpFn, mlp_module, replace_mlp, token_ce

log = logging.getLogger(__name__)

DEAD_AFTER_TOKENS = 100_000
"""During training, a latent that has not fired for this many tokens counts as dead (AuxK loss)."""

HELD_OUT_FRACTION = 0.1
"""Fraction of the cached tokens held out to measure FVU and dead latents (at most MAX_HELD_OUT)."""

MAX_HELD_OUT = 16_384
"""Cap on held-out tokens."""


# -------------------------------------------------------------------------------- caching


@torch.no_grad()
def collect_mlp_io(model: torch.nn.Module, layer: int, tokens: np.ndarray, batch_size: int,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """MLP input and output at ``layer`` for every token, each float32 [n_tokens, d] on CPU.

    Tokens are flattened in (sequence, position) order.
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs.append(args[0].detach().flatten(0, 1).float().cpu())
        outputs.append(output.detach().flatten(0, 1).float().cpu())

    data = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    handle = mlp_module(model, layer).register_forward_hook(hook)
    try:
        for start in range(0, len(data), batch_size):
            model(input_ids=data[start:start + batch_size].to(device))
    finally:
        handle.remove()
    return torch.cat(inputs), torch.cat(outputs)


# -------------------------------------------------------------------------------- forward


def transcoder_output(sae: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    """``decode(topk(x)) + b_dec + x @ W_skip.T`` for x of shape [..., d] (raw x, no b_dec subtraction)."""
    flat = x.reshape(-1, x.shape[-1]).to(sae.dtype)
    top_acts, top_indices, _ = sae.encode(flat)
    out = sae.decode(top_acts, top_indices)  # includes b_dec
    if sae.W_skip is not None:
        out = out + flat @ sae.W_skip.mT
    return out.reshape(x.shape).to(x.dtype)


def skip_output(sae: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    """The transcoder with every latent zero (zero-ablation): ``b_dec + x @ W_skip.T``."""
    flat = x.reshape(-1, x.shape[-1]).to(sae.dtype)
    out = sae.b_dec.expand(flat.shape[0], -1)
    if sae.W_skip is not None:
        out = out + flat @ sae.W_skip.mT
    return out.reshape(x.shape).to(x.dtype)


def transcoder_fn(sae: SparseCoder) -> MlpFn:
    """An MLP replacement (for ``replace_mlp``) that runs the transcoder."""
    return lambda x: transcoder_output(sae, x)


def skip_fn(sae: SparseCoder) -> MlpFn:
    """An MLP replacement (for ``replace_mlp``) that runs the zero-ablated transcoder."""
    return lambda x: skip_output(sae, x)


# ------------------------------------------------------------------------------- training


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


@torch.no_grad()
def evaluate_fit(sae: SparseCoder, X: torch.Tensor, Y: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """FVU of the transcoder on (X, Y) and the fraction of latents that never fire on X."""
    fired = torch.zeros(sae.num_latents, dtype=torch.bool)
    sq_err = 0.0
    for start in range(0, len(X), batch):
        x, y = X[start:start + batch], Y[start:start + batch]
        top_acts, top_indices, _ = sae.encode(x)
        out = sae.decode(top_acts, top_indices) + x @ sae.W_skip.mT
        sq_err += float((y - out).pow(2).sum())
        fired[top_indices[top_acts > 0]] = True
    total_var = float((Y - Y.mean(0)).pow(2).sum())
    return {"fvu": sq_err / total_var, "dead_fraction": float(1 - fired.float().mean())}


def train_transcoder(X: torch.Tensor, Y: torch.Tensor, cfg: TranscoderConfig,
                     log_every: int = 250) -> tuple[SparseCoder, dict[str, float]]:
    """Train a TopK skip transcoder mapping MLP inputs X to outputs Y ([n_tokens, d] each).

    Deterministic (seeded init, split and batch order). A random ``HELD_OUT_FRACTION`` of the
    tokens is held out; Adam with linear warmup (10% of steps) and linear decay, loss
    FVU + auxk_alpha * AuxK (latents silent for ``DEAD_AFTER_TOKENS`` count as dead). Returns the
    transcoder (eval mode) and metrics: fvu and dead_fraction on held-out tokens, train_fvu (last
    10% of steps), steps, lr, train_tokens, held_out_tokens, wall_s.
    """
    X = X.float().contiguous()
    Y = Y.float().contiguous()
    t0 = time.perf_counter()
    train_idx, val_idx = held_out_split(len(X), cfg.seed)
    X_tr, Y_tr = X[train_idx], Y[train_idx]
    sae = new_transcoder(X.shape[1], cfg)
    init_biases(sae, X_tr, Y_tr)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.num_latents)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = max(1, cfg.steps // 10)
    gen = torch.Generator().manual_seed(cfg.seed)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    batch = min(cfg.batch_tokens, len(X_tr))
    perm = torch.randperm(len(X_tr), generator=gen)
    cursor = 0
    fvus: list[float] = []
    for step in range(cfg.steps):
        if cursor + batch > len(perm):
            perm, cursor = torch.randperm(len(X_tr), generator=gen), 0
        idx = perm[cursor:cursor + batch]
        cursor += batch
        for group in opt.param_groups:
            group["lr"] = lr * linear_warmup_decay(step, cfg.steps, warmup)
        dead_mask = since_fired > DEAD_AFTER_TOKENS if cfg.auxk_alpha > 0 else None
        out = sae(X_tr[idx], Y_tr[idx], dead_mask=dead_mask)
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            fired = torch.zeros(sae.num_latents, dtype=torch.bool)
            fired[out.latent_indices[out.latent_acts > 0]] = True
            since_fired += batch
            since_fired[fired] = 0
        fvus.append(float(out.fvu.detach()))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            log.info("transcoder step %d/%d fvu %.4f auxk %.4f dead %d", step + 1, cfg.steps, fvus[-1],
                     float(out.auxk_loss.detach()), int((since_fired > DEAD_AFTER_TOKENS).sum()))
    sae.eval()
    metrics = evaluate_fit(sae, X[val_idx], Y[val_idx])
    metrics.update({
        "train_fvu": float(np.mean(fvus[-max(1, cfg.steps // 10):])),
        "steps": cfg.steps, "lr": lr, "train_tokens": len(X_tr), "held_out_tokens": len(val_idx),
        "wall_s": time.perf_counter() - t0,
    })
    return sae, metrics


# ---------------------------------------------------------------------------- checkpoints


def save_transcoder(sae: SparseCoder, path: str | Path) -> None:
    """Write a sparsify-format checkpoint directory (``cfg.json`` + ``sae.safetensors``)."""
    sae.save_to_disk(path)


HUB_PREFIX = "hf://"
"""A checkpoint on the Hugging Face hub: hf://<owner>/<repo>[/<hookpoint>] (sparsify's layout: one
folder per hookpoint, e.g. hf://EleutherAI/skip-transcoder-pythia-160m-32k/layers.6.mlp)."""


def _hub_location(path: str) -> tuple[str, str | None]:
    """(repo id, hookpoint or None) of an hf://owner/repo[/hookpoint] checkpoint."""
    parts = path[len(HUB_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise ConfigError(f"transcoder.checkpoint {path!r}: expected {HUB_PREFIX}<owner>/<repo>[/<hookpoint>]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def load_transcoder(path: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
    """Load a sparsify-format checkpoint (ours or one written by sparsify), in eval mode: a local
    directory, or `hf://owner/repo[/hookpoint]` through sparsify's hub loader (the local HF cache
    when HF_HUB_OFFLINE is set)."""
    if str(path).startswith(HUB_PREFIX):
        name, hookpoint = _hub_location(str(path))
        return SparseCoder.load_from_hub(name, hookpoint, device=device).eval()
    return SparseCoder.load_from_disk(path, device=device).eval()


def checkpoint_shape(path: str) -> dict[str, int]:
    """d_in, num_latents and k of a checkpoint, from its cfg.json alone (a local directory, or
    hf://owner/repo[/hookpoint]: only cfg.json is fetched, from the local HF cache when offline).
    A missing, unreadable or malformed checkpoint raises ConfigError naming transcoder.checkpoint."""
    where = f"transcoder.checkpoint {path!r}"
    if path.startswith(HUB_PREFIX):
        from huggingface_hub import hf_hub_download

        name, hookpoint = _hub_location(path)
        try:
            cfg_file = Path(hf_hub_download(name, f"{hookpoint}/cfg.json" if hookpoint else "cfg.json"))
        except Exception as e:  # not on the hub, not in the cache when offline, no network
            raise ConfigError(f"{where}: cannot get its cfg.json from the Hugging Face hub or the local cache "
                              f"({type(e).__name__}); check the repo and hookpoint, or download it first") from None
    else:
        d = Path(path)
        missing = [f for f in ("cfg.json", "sae.safetensors") if not (d / f).is_file()]
        if missing:
            raise ConfigError(f"{where}: {'no such directory' if not d.is_dir() else 'no ' + ' or '.join(missing)}; "
                              f"give a sparsify checkpoint directory (cfg.json + sae.safetensors) or "
                              f"{HUB_PREFIX}<owner>/<repo>[/<hookpoint>]")
        cfg_file = d / "cfg.json"
    try:
        raw = json.loads(cfg_file.read_text())
        d_in = int(raw["d_in"])
        num_latents = int(raw.get("num_latents") or 0) or d_in * int(raw.get("expansion_factor", 32))
        k = int(raw.get("k", 32))
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        raise ConfigError(f"{where}: its cfg.json is not a sparsify config ({type(e).__name__}: {e}); "
                          "it needs at least d_in, and num_latents or expansion_factor") from None
    return {"d_in": d_in, "num_latents": num_latents, "k": k}


def check_checkpoint(shape: dict[str, int], d_model: int | None, cfg: TranscoderConfig) -> None:
    """Refuse a checkpoint that does not fit: its width is not the subject's hidden size (`d_model`,
    None when unknown), or its num_latents / k differ from the config's. The config is never
    silently overridden by the checkpoint: stage keys, the summary and the evaluation all read it."""
    where = f"transcoder.checkpoint {cfg.checkpoint!r}"
    if d_model is not None and shape["d_in"] != d_model:
        raise ConfigError(f"{where} reads vectors of width {shape['d_in']} but the subject's hidden size is "
                          f"{d_model}: use a checkpoint trained on this subject's layer {cfg.layer} MLP")
    if (shape["num_latents"], shape["k"]) != (cfg.num_latents, cfg.k):
        raise ConfigError(f"{where} has num_latents {shape['num_latents']} and k {shape['k']}, the config "
                          f"num_latents {cfg.num_latents} and k {cfg.k}: set transcoder.num_latents: "
                          f"{shape['num_latents']} and transcoder.k: {shape['k']}")


# ----------------------------------------------------------------------------- evaluation


def transcoder_ce(model: torch.nn.Module, layer: int, sae: SparseCoder, eval_tokens: np.ndarray,
                  batch_size: int, device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean eval CE: clean, MLP zeroed, transcoder in place of the MLP, and transcoder zero-ablated.

    Also ``ce_recovered`` = (zero_ablation - transcoder) / (zero_ablation - clean), where
    zero-ablation keeps only b_dec and the skip path.
    """
    def mean_ce() -> float:
        return float(token_ce(model, eval_tokens, batch_size, device).mean())

    clean = mean_ce()
    with replace_mlp(model, layer, torch.zeros_like):
        mlp_zero = mean_ce()
    with replace_mlp(model, layer, transcoder_fn(sae)):
        with_tc = mean_ce()
    with replace_mlp(model, layer, skip_fn(sae)):
        zero = mean_ce()
    gap = zero - clean
    return {"ce_clean": clean, "ce_mlp_zero": mlp_zero, "ce_transcoder": with_tc, "ce_zero_ablation": zero,
            "ce_recovered": (zero - with_tc) / gap if gap != 0 else float("nan")}
