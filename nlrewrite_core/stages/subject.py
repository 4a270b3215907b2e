"""The subject stage: the model whose MLP is rewritten, trained from scratch on the corpus or loaded from the
hub (nlrewrite_core.subject), with its eval CE and each layer's MLP-ablation cost."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import torch

from .. import artifacts as art, evaluate as eval_lib, stages, subject as subject_lib
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..storage import Store

log = logging.getLogger("nlrewrite")


def train_subject(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """The subject model (trained on the train split, or loaded from the hub), with its eval CE."""
    if ref := stages.reuse(store, "subject", keys):
        return ref
    w = stages.writer(store, "subject", cfg, keys)
    device = art.device(cfg)
    _, train = art.load_tokens(store, keys, ("train",))
    _, eval_tokens = art.load_tokens(store, keys, ("eval",))
    tokenizer = art.load_tokenizer(store, keys)
    if cfg.subject.source == "hub":
        assert cfg.subject.hub_id is not None  # SubjectConfig requires it when the source is 'hub'
        model = subject_lib.load_hub_model(cfg.subject.hub_id, device=device)
        weight = model.get_input_embeddings().weight
        assert isinstance(weight, torch.Tensor)  # an embedding's weight (Module attributes are typed Tensor | Module)
        n_vocab = weight.shape[0]
        top = int(max(train.max(initial=0), eval_tokens.max(initial=0)))
        if top >= n_vocab:
            raise ValueError(f"the corpus holds token id {top} but subject.hub_id {cfg.subject.hub_id!r} has only "
                             f"{n_vocab} embeddings: corpus.tokenizer ({cfg.corpus.tokenizer!r}) must be the subject's")
        metrics: dict[str, Any] = {"hub_id": cfg.subject.hub_id, "tokenizer": cfg.corpus.tokenizer,
                                   "n_params": subject_lib.num_params(model)}
    else:
        model = subject_lib.to_device(
            subject_lib.build_model(cfg.subject, tokenizer.get_vocab_size(), cfg.corpus.seq_len), device)
        metrics = subject_lib.train_subject(model, train, cfg.subject, device=device)
    model.eval()
    ce = eval_lib.ce_with(model, 0, eval_tokens, cfg.evaluate.batch_size, None)
    metrics["eval_ce"] = float(ce.mean())
    metrics["unigram_ce"] = subject_lib.unigram_ce(train, eval_tokens, tokenizer.get_vocab_size())
    metrics["mlp_ablation_ce"] = subject_lib.mlp_ablation_costs(model, eval_tokens, cfg.evaluate.batch_size, device)
    log.info("subject: eval CE %.3f (unigram %.3f); CE with each layer's MLP zeroed: %s", metrics["eval_ce"],
             metrics["unigram_ce"], [round(c, 3) for c in metrics["mlp_ablation_ce"]])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        w.directory("model", tmp)
    return w.finish(metrics=metrics)
