"""The transcoder stage: a TopK skip transcoder of one MLP (trained streaming from the subject, or a
checkpoint), its fit on the eval split (FVU, dead latents, CE) (nlrewrite_core.transcoder,
nlrewrite_core.transcoder_train)."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa

from .. import artifacts as art, evaluate as eval_lib, stages, transcoder as tc_lib, transcoder_train as train_lib
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..storage import Store

log = logging.getLogger("nlrewrite")


def train_transcoder(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """The transcoder of transcoder.layer (trained streaming, or a checkpoint) and its fit on eval."""
    if ref := stages.reuse(store, "transcoder", keys):
        return ref
    w = stages.writer(store, "transcoder", cfg, keys)
    device = art.device(cfg)
    model = art.load_subject(store, keys, device)
    layer = cfg.transcoder.layer
    n_layers = model.config.num_hidden_layers
    if layer >= n_layers:
        raise ValueError(f"transcoder.layer ({layer}) is out of range: the subject has {n_layers} layers")
    if cfg.transcoder.checkpoint:  # refused unless it fits the subject and the config (also checked up front)
        tc_lib.check_checkpoint(tc_lib.checkpoint_shape(cfg.transcoder.checkpoint), model.config.hidden_size,
                                cfg.transcoder)
        sae = tc_lib.load_transcoder(cfg.transcoder.checkpoint).to(device)
        eval_lib.check_supported(sae)  # a TopK transcoder, or a clear refusal before any work
        metrics: dict[str, Any] = {"checkpoint": cfg.transcoder.checkpoint}
    else:
        _, train = art.load_tokens(store, keys, ("train",))
        n_seq = max(1, min(len(train), cfg.transcoder.max_train_tokens // train.shape[1]))
        train = train[:n_seq].astype(np.int32)  # token ids only: MLP inputs/outputs are streamed
        # Checkpoints live in the artifact directory (a directory without a manifest survives a restart)
        # and go once the stage is done.
        checkpoints = train_lib.Checkpoints(store, store.artifact_dir("transcoder", keys["transcoder"], "checkpoints"),
                                         f"layers.{layer}.mlp")
        sae, metrics = train_lib.train_streaming(model, layer, train, cfg.transcoder, cfg.evaluate.batch_size, device,
                                              checkpoints)
        del train
    sae.eval()
    # The fit on the eval split: FVU, dead latents, and CE (clean, transcoder, zero-ablation, MLP zeroed).
    _, eval_tokens = art.load_tokens(store, keys, ("eval",))
    Xe, Ye = tc_lib.collect_mlp_io(model, layer, eval_tokens, cfg.evaluate.batch_size, device)
    fit_eval = tc_lib.evaluate_fit(sae, Xe.to(sae.dtype), Ye.to(sae.dtype))
    ce = tc_lib.transcoder_ce(model, layer, sae, eval_tokens, cfg.evaluate.batch_size, device)
    fit = {"eval_fvu": fit_eval["fvu"], "eval_dead_fraction": fit_eval["dead_fraction"], **ce,
           "zero_ablation_cost_frac": (ce["ce_zero_ablation"] - ce["ce_clean"]) / ce["ce_clean"], "layer": layer}
    log.info("transcoder: FVU %.4f, dead %.1f%%, CE recovered %.3f, CE %s", fit["eval_fvu"],
             100 * fit["eval_dead_fraction"], ce["ce_recovered"], {k: round(v, 4) for k, v in ce.items()})
    with tempfile.TemporaryDirectory() as tmp:
        tc_lib.save_transcoder(sae, tmp)
        w.directory("sae", tmp)
    w.table("fit", pa.table({"metric": list(fit), "value": [float(v) for v in fit.values()]}))
    ref = w.finish(metrics={**metrics, **fit})
    store.remove_dir(store.artifact_dir("transcoder", keys["transcoder"], "checkpoints"))
    return ref
