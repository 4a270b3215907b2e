"""Sparse latent cache: the transcoder's top-k latents for every token of the chosen splits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from .subject import mlp_module

if TYPE_CHECKING:
    from sparsify import SparseCoder

ACTIVATION_SCHEMA = pa.schema([
    ("seq_id", pa.int64()), ("pos", pa.int32()), ("latent", pa.int32()), ("act", pa.float32()),
])


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the MLP input is known."""


@torch.no_grad()
def mlp_inputs(model: torch.nn.Module, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """The MLP input at `layer` for a batch of token ids [b, t] -> [b, t, d].

    The forward pass stops at that MLP: later layers are never computed.
    """
    captured: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach())
        raise _Captured

    handle = mlp_module(model, layer).register_forward_pre_hook(hook)
    try:
        model(input_ids=tokens)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def iter_latents(model: torch.nn.Module, sae: SparseCoder, layer: int, tokens: np.ndarray,
                 seq_ids: np.ndarray, batch_size: int, device: str = "cpu") -> Iterator[pa.RecordBatch]:
    """Yield the sparse latent cache batch by batch (bounded memory): seq_id, pos, latent, act.

    Only non-zero activations are kept (TopK may select zeros when fewer than k pre-activations
    are positive).
    """
    seq_len = tokens.shape[1]
    for start in range(0, len(tokens), batch_size):
        batch = torch.as_tensor(tokens[start:start + batch_size], dtype=torch.long, device=device)
        x = mlp_inputs(model, layer, batch)
        x = x.reshape(-1, x.shape[-1]).to(sae.dtype)
        top_acts, top_idx, _ = sae.encode(x)
        acts = top_acts.float().cpu().numpy()
        idx = top_idx.cpu().numpy()
        k = idx.shape[1]
        n = batch.shape[0]
        sid = np.repeat(seq_ids[start:start + n].astype(np.int64), seq_len * k)
        pos = np.tile(np.repeat(np.arange(seq_len, dtype=np.int32), k), n)
        keep = acts.reshape(-1) > 0
        yield pa.RecordBatch.from_arrays(
            [pa.array(sid[keep]), pa.array(pos[keep]), pa.array(idx.reshape(-1)[keep].astype(np.int32)),
             pa.array(acts.reshape(-1)[keep])],
            schema=ACTIVATION_SCHEMA,
        )


def latent_stats(acts: pa.Table, n_tokens: dict[str, int], num_latents: int) -> pa.Table:
    """Per-latent statistics for each split, grouped by latent id (never by row position).

    `acts` has columns split, latent, act; `n_tokens` gives each split's token count.
    Columns: split, latent, n_active, frequency, max_act, mean_act (mean over active tokens).
    """
    out = []
    split_col = acts.column("split").to_numpy(zero_copy_only=False)
    lat = acts.column("latent").to_numpy()
    val = acts.column("act").to_numpy()
    for split in sorted(n_tokens):
        m = split_col == split
        count = np.bincount(lat[m], minlength=num_latents)
        total = np.bincount(lat[m], weights=val[m], minlength=num_latents)
        mx = np.zeros(num_latents, dtype=np.float64)
        np.maximum.at(mx, lat[m], val[m])
        out.append(pa.table({
            "split": pa.array([split] * num_latents),
            "latent": pa.array(np.arange(num_latents, dtype=np.int32)),
            "n_active": pa.array(count.astype(np.int64)),
            "frequency": pa.array(count / max(n_tokens[split], 1)),
            "max_act": pa.array(mx.astype(np.float32)),
            "mean_act": pa.array(np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)),
        }))
    return pa.concat_tables(out)


FLOAT16_MAX = 65504.0
"""The largest finite float16: a cached activation above it would be stored as inf."""


def check_storable(acts: np.ndarray, dtype: str) -> None:
    """Refuse activation values the cache's storage dtype cannot hold (float16 turns values above
    65504 into inf), with the fix, before anything is written."""
    if dtype == "float16" and acts.size:
        top = float(np.max(acts))
        if not top <= FLOAT16_MAX:
            raise ValueError(f"activations.dtype is float16 but a latent activation reaches {top:.6g} (float16 holds "
                             f"at most {FLOAT16_MAX:g}, larger values become inf): set activations.dtype: float32")
