"""What a config asks of the machine and of the files it names, checked before anything is written.

`check_run` raises ConfigError (the CLI exits 2 with its one line) for what a config alone cannot
tell: a CUDA device that is not there, an LLM backend that is not installed, a transcoder checkpoint
that is missing, malformed or does not fit the subject and the config, a corpus certainly too small
for its splits. `nlrewrite run` calls it before Prefect starts; the `rewrite` flow calls it again
before its first stage (a deployment run never passes through the CLI).
"""

from __future__ import annotations

import importlib.util
import logging

from .config import ConfigError, CorpusConfig, LLMConfig, RewriteConfig

log = logging.getLogger("nlrewrite")

BYTES_PER_CHAR_BOUND = 1.1
"""Upper bound on UTF-8 bytes per character of the python-docs text (measured: 1.0006)."""


def llm_sections(cfg: RewriteConfig) -> list[tuple[str, LLMConfig]]:
    """(section name, LLMConfig) of every section whose method calls its LLM in this run's process
    (the simulator's runs on GPU workers when execution.fanout is 'deployment')."""
    uses = {"explain": cfg.explain.method in ("llm", "contrastive"), "score": cfg.score.method == "detection",
            "simulate": cfg.simulate.method == "llm" and cfg.execution.fanout == "local"}
    return [(name, getattr(cfg, name).llm) for name, used in uses.items() if used and getattr(cfg, name).llm]


def check_devices(cfg: RewriteConfig) -> None:
    import torch

    if torch.cuda.is_available():
        return
    if cfg.execution.device == "cuda":
        raise ConfigError("execution.device is 'cuda' but this machine has no CUDA device: "
                          "set execution.device: cpu (or auto), or run on a GPU machine")
    for name, llm in llm_sections(cfg):
        if llm.backend == "transformers" and llm.device == "cuda":
            raise ConfigError(f"{name}.llm.device is 'cuda' but this machine has no CUDA device: "
                              f"set {name}.llm.device: cpu (or auto), or run on a GPU machine")


def check_backends(cfg: RewriteConfig) -> None:
    for name, llm in llm_sections(cfg):
        if llm.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{name}.llm.backend is 'vllm' but vLLM is not installed here: "
                              f"pip install 'nlrewrite[vllm]' on a GPU machine, or use backend transformers or openai")


def subject_width(cfg: RewriteConfig) -> int | None:
    """The subject's hidden size: the config's for a trained subject, the hub config's (when it can be
    read locally) for a hub subject; None when unknown (the transcoder stage checks it again)."""
    if cfg.subject.source == "train":
        return cfg.subject.hidden_size
    if cfg.subject.hub_id is None:  # the config's validation refuses this
        return None
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(cfg.subject.hub_id).hidden_size)
    except Exception:  # not in the cache, offline: the stage that loads the model reports it
        return None


def check_checkpoint(cfg: RewriteConfig) -> None:
    if not cfg.transcoder.checkpoint:
        return
    from . import transcoder as tc_lib

    tc_lib.check_checkpoint(tc_lib.checkpoint_shape(cfg.transcoder.checkpoint), subject_width(cfg), cfg.transcoder)


def max_sequences(cfg: CorpusConfig) -> int | None:
    """An upper bound on the corpus's sequences, from the config alone (None for sources it cannot
    bound): at most one token per byte (byte-level tokenizers) of the at most `max_chars` characters,
    plus one eos per document (documents are 2 characters apart, so at most max_chars / 3 + 1 of them)."""
    if cfg.source != "python-docs":
        return None
    tokens = int(cfg.max_chars * BYTES_PER_CHAR_BOUND) + cfg.max_chars // 3 + 1
    return tokens // cfg.seq_len


def check_corpus(cfg: RewriteConfig) -> None:
    """A corpus certainly too small for its splits is refused now; one that only turns out too small
    once built is refused by the corpus stage (the same check on the real count), before it writes."""
    from .corpus import check_split_sizes

    bound = max_sequences(cfg.corpus)
    if bound is not None:
        check_split_sizes(bound, cfg.corpus, estimate=True)


def check_run(cfg: RewriteConfig) -> None:
    """Every check above; raises ConfigError naming the field and the fix."""
    check_corpus(cfg)
    check_devices(cfg)
    check_backends(cfg)
    check_checkpoint(cfg)


def apply_threads(cfg: RewriteConfig) -> None:
    """execution.threads: torch's intra-op threads for this process (None keeps torch's default)."""
    if cfg.execution.threads is not None:
        import torch

        if torch.get_num_threads() != cfg.execution.threads:
            torch.set_num_threads(cfg.execution.threads)
            log.info("execution.threads: torch uses %d threads", cfg.execution.threads)
