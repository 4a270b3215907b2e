"""One small LLM interface for the explainer, the detection scorer and the simulator.

Two operations: `generate` (text answers) and `top_logprobs` (the top-k next-token
log-probabilities of each prompt). A `Prompt` is a shared `prefix` plus a per-prompt `suffix`:
backends that can (transformers) encode each distinct prefix once and reuse its KV cache across
the suffixes; the others send `prefix + suffix` (vLLM's prefix cache and a server's find the
shared part themselves; prompts are ordered so shared prefixes are adjacent).

A third operation, `slot_logprobs`, serves the all-at-once simulator: a `SlotPrompt` is a prefix
and a sequence of pieces with a slot after each; the backend returns the top-k next-token
log-probabilities at every slot from one pass over the prompt (prompt log-probabilities).

Backends: `transformers` (.hf), `openai` (.openai_api), `vllm` (.vllm_backend, imported lazily).
Every call adds its prompts, tokens in/out and seconds to `LLM.usage` (cost accounting).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import LLMConfig


class LLMError(RuntimeError):
    """A backend call failed (after its retries). The message never holds an API key.

    `retryable`: a later attempt may succeed (the endpoint was unreachable, timed out, or answered
    429/5xx through every retry); False for answers that will not change (401, 404, a bad request)."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable

    def __reduce__(self):  # keep `retryable` through pickling (Prefect states, process pools)
        return type(self), (str(self), self.retryable)


@dataclass(frozen=True)
class Prompt:
    """A prompt as a shared prefix and a per-prompt suffix; the text sent is prefix + suffix."""

    prefix: str
    suffix: str = ""

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


@dataclass(frozen=True)
class SlotPrompt:
    """A prompt read at many positions: the shared `prefix`, then `pieces`, with a slot after each piece;
    the distribution at slot i is the next-token distribution after prefix + pieces[0] + ... + pieces[i]
    (the text the model has then seen). Backends that tokenize themselves put a token boundary at every
    slot (`transformers`, `vllm`: each piece tokenized on its own); the `openai` one finds each slot by its
    character offset among the server's tokens."""

    prefix: str
    pieces: tuple[str, ...]
    read: tuple[int, ...] | None = None
    """The slots whose distributions are returned, in order (None: every slot)."""

    @property
    def text(self) -> str:
        return self.prefix + "".join(self.pieces)

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(range(len(self.pieces))) if self.read is None else self.read

    def offsets(self) -> list[int]:
        """Character offset in `text` of each slot read."""
        ends, at = [], len(self.prefix)
        for piece in self.pieces:
            at += len(piece)
            ends.append(at)
        return [ends[i] for i in self.slots]


def slot_token_ids(p: SlotPrompt, encode: Callable[[str, bool], list[int]]) -> tuple[list[int], list[int], list[int]]:
    """(prefix ids, suffix ids, slot columns) of a slot prompt for backends that tokenize themselves.
    `encode(text, first)` tokenizes one piece (first: the prompt's first piece, which gets the
    tokenizer's start tokens). Each piece is tokenized on its own, so every slot starts a token
    whatever the tokenizer would merge across it; the distribution at slot i is the next-token
    distribution after suffix token cols[i] (one column per slot read)."""
    pre = encode(p.prefix, True) if p.prefix else []
    suf: list[int] = []
    cols: list[int] = []
    for n, piece in enumerate(p.pieces):
        ids = encode(piece, not pre and n == 0) if piece else []
        if not ids:
            raise ValueError(f"slot prompt piece {n} ({piece!r}) has no tokens: a slot needs a token before it")
        suf += ids
        cols.append(len(suf) - 1)
    return pre, suf, [cols[i] for i in p.slots]


@dataclass
class Usage:
    """Accumulated cost of an LLM's calls."""

    calls: int = 0
    prompts: int = 0
    tokens_in: int = 0
    tokens_in_cached: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw: float) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def since(self, before: dict[str, float]) -> dict[str, float]:
        """The usage accumulated since `before` (a snapshot), as a manifest `cost` dict."""
        now = self.snapshot()
        out = {f"llm_{k}" if k in ("calls", "prompts", "seconds", "retries") else k: now[k] - before.get(k, 0)
               for k in now}
        out["llm_seconds"] = round(out["llm_seconds"], 3)
        return out


PromptLike = Prompt | str


def as_prompt(p: PromptLike) -> Prompt:
    return p if isinstance(p, Prompt) else Prompt(p, "")


_LLAMA3_HEAD = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
_LLAMA3_TAIL = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


class LLM:
    """The interface. Subclasses implement `_generate` and `_top_logprobs` on wrapped prompts."""

    backend = "base"

    def __init__(self, cfg: LLMConfig):
        self.cfg = cfg
        self.usage = Usage()
        self.last_tokens: list[tuple[int, int]] = []
        """(tokens in, tokens out) of each prompt of the latest `generate` call, in order."""

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.cfg.model}"

    def wrap(self, p: PromptLike) -> Prompt:
        """Apply the chat format as text (the head joins the prefix, the tail the suffix)."""
        p = as_prompt(p)
        if self.cfg.chat_format == "llama3":
            return Prompt(_LLAMA3_HEAD + p.prefix, p.suffix + _LLAMA3_TAIL)
        return p

    def wrap_slots(self, p: SlotPrompt) -> SlotPrompt:
        """The chat format for a slot prompt: the prefix is the user turn and the slotted text the start
        of the assistant's answer (delphi's layout)."""
        if self.cfg.chat_format == "llama3":
            return SlotPrompt(_LLAMA3_HEAD + p.prefix + _LLAMA3_TAIL, p.pieces, p.read)
        return p

    def generate(self, prompts: Sequence[PromptLike], max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int | None = None) -> list[str]:
        """One answer per prompt, in order."""
        if not prompts:
            return []
        return self._generate([self.wrap(p) for p in prompts], max_new_tokens or self.cfg.max_new_tokens,
                              self.cfg.temperature if temperature is None else temperature,
                              self.cfg.seed if seed is None else seed)

    def top_logprobs(self, prompts: Sequence[PromptLike], k: int | None = None) -> list[dict[str, float]]:
        """For each prompt, {token text: logprob} of its k most likely next tokens (token texts
        that collide are merged by adding their probabilities)."""
        if not prompts:
            return []
        return self._top_logprobs([self.wrap(p) for p in prompts], k or self.cfg.top_logprobs)

    def slot_logprobs(self, prompts: Sequence[SlotPrompt], k: int | None = None) -> list[list[dict[str, float] | None]]:
        """For each prompt, {token text: logprob} of the k most likely tokens at each of its slots, in
        order; None at a slot the backend could not place on a token boundary (a failed prediction)."""
        if not prompts:
            return []
        return self._slot_logprobs([self.wrap_slots(p) for p in prompts], k or self.cfg.top_logprobs)

    def _generate(self, prompts: list[Prompt], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        raise NotImplementedError

    def _slot_logprobs(self, prompts: list[SlotPrompt], k: int) -> list[list[dict[str, float] | None]]:
        raise NotImplementedError(f"the {self.backend} backend has no prompt log-probabilities")

    def _top_logprobs(self, prompts: list[Prompt], k: int) -> list[dict[str, float]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def merge_logprob(d: dict[str, float], token: str, lp: float) -> None:
    """Add a token's probability to d (log-sum-exp when the token text is already there)."""
    if token in d:
        a, b = max(d[token], lp), min(d[token], lp)
        d[token] = a + math.log1p(math.exp(b - a)) if b > -math.inf else a
    else:
        d[token] = lp


def make_llm(cfg: LLMConfig) -> LLM:
    """A new backend instance for cfg."""
    if cfg.backend == "transformers":
        from .hf import TransformersLLM

        return TransformersLLM(cfg)
    if cfg.backend == "openai":
        from .openai_api import OpenAILLM

        return OpenAILLM(cfg)
    if cfg.backend == "vllm":
        from .vllm_backend import VLLMLLM

        return VLLMLLM(cfg)
    raise ValueError(f"unknown LLM backend {cfg.backend!r}")


@lru_cache(maxsize=2)
def get_llm(cfg: LLMConfig) -> LLM:
    """A cached backend for cfg (loading a model once per process; stages read usage deltas)."""
    return make_llm(cfg)
