"""Transcoder model side: a TopK skip transcoder (sparsify's ``SparseCoder``) that replaces one MLP.

The transcoder maps the MLP's input x to ``decode(topk(relu(W_enc x + b_enc))) + b_dec + W_skip x``
(sparsify's formula for transcoders: no b_dec subtraction before encoding). This module holds what
runs the subject and the transcoder: MLP inputs/outputs at a layer, the transcoder's and the
zero-ablated transcoder's outputs, fit metrics (FVU, dead latents), CE with the transcoder in place,
and checkpoints in sparsify's format (``cfg.json`` + ``sae.safetensors``, local or on the hub).
Training (the Adam loop, the streaming shuffle buffer, resumable checkpoints) is in
nlrewrite_core.transcoder_train.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

with contextlib.redirect_stdout(io.StringIO()):  # sparsify prints a Triton notice on import
    from sparsify import SparseCoder

from nlrewrite_core.config import ConfigError, TranscoderConfig
from nlrewrite_core.subject import MlpFn, mlp_module, replace_mlp, token_ce

# -------------------------------------------------------------------------------- caching


class _StopForward(Exception):
    """Raised by the capture hook: the layers after the hooked MLP are not needed."""


def autocast(device: str | torch.device):
    """bf16 autocast on CUDA (the subject's forward and the transcoder's training), nothing elsewhere."""
    dev = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def iter_mlp_io(model: torch.nn.Module, layer: int, tokens: np.ndarray, batch_size: int,
                device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """MLP input and output at ``layer`` for ``batch_size`` sequences at a time, each float32
    [batch_tokens, d] on ``device``, tokens in (sequence, position) order. The forward stops after
    the hooked MLP (later layers cannot change it); bf16 autocast on CUDA."""
    got: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        got.extend((args[0].detach().flatten(0, 1).float(), output.detach().flatten(0, 1).float()))
        raise _StopForward

    handle = mlp_module(model, layer).register_forward_hook(hook)
    try:
        for start in range(0, len(tokens), batch_size):
            ids = torch.as_tensor(np.asarray(tokens[start:start + batch_size], dtype=np.int64)).to(device)
            got.clear()
            try:
                with autocast(device):
                    model(input_ids=ids)
            except _StopForward:
                pass
            yield got[0], got[1]
    finally:
        handle.remove()


def collect_mlp_io(model: torch.nn.Module, layer: int, tokens: np.ndarray, batch_size: int,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """MLP input and output at ``layer`` for every token, each float32 [n_tokens, d] on CPU (for a
    bounded set of tokens: the eval split, a held-out sample; training streams, see train_streaming)."""
    xs, ys = zip(*((x.cpu(), y.cpu()) for x, y in iter_mlp_io(model, layer, tokens, batch_size, device)))
    return torch.cat(xs), torch.cat(ys)


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


# ------------------------------------------------------------------------------------ fit


@torch.no_grad()
def evaluate_fit(sae: SparseCoder, X: torch.Tensor, Y: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """FVU of the transcoder on (X, Y) and the fraction of latents that never fire on X."""
    dev = sae.W_dec.device
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=dev)
    sq_err = 0.0
    for start in range(0, len(X), batch):
        x, y = X[start:start + batch].to(dev, sae.dtype), Y[start:start + batch].to(dev, sae.dtype)
        top_acts, top_indices, _ = sae.encode(x)
        out = sae.decode(top_acts, top_indices) + x @ sae.W_skip.mT
        sq_err += float((y - out).pow(2).sum())
        fired[top_indices[top_acts > 0]] = True
    total_var = float((Y - Y.mean(0)).pow(2).sum())
    return {"fvu": sq_err / total_var, "dead_fraction": float(1 - fired.float().mean())}


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
