"""The `vllm` backend: the offline vllm.LLM engine with automatic prefix caching.

vLLM is an optional extra (`pip install nlrewrite[vllm]`), imported only when this backend is
built. Prompts are sent sorted by text so that those sharing a prefix are adjacent (the prefix
cache then holds each shared block once); answers come back in the caller's order.

`slot_logprobs` (the all-at-once simulator) sends token ids (each piece of a slot prompt tokenized
on its own by the engine's tokenizer, so every slot starts a token) with `prompt_logprobs=k`: the
distribution at a slot is the prompt log-probabilities entry of the token that starts it, or the
first sampled token's for a slot at the very end. vLLM's prefix cache is not used for requests that
ask for prompt log-probabilities (they need every prompt position's logits), so each prompt is
computed whole.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from . import LLM, LLMError, Prompt, SlotPrompt, merge_logprob, slot_token_ids


class VLLMLLM(LLM):
    backend = "vllm"

    def __init__(self, cfg):
        super().__init__(cfg)
        try:
            import vllm
        except ImportError:
            raise LLMError("the vllm backend needs vLLM: pip install 'nlrewrite[vllm]' (GPU machines)") from None
        self._vllm = vllm
        self.engine = vllm.LLM(model=cfg.model, enable_prefix_caching=True, seed=cfg.seed,
                               dtype="auto" if cfg.dtype == "auto" else cfg.dtype,
                               gpu_memory_utilization=cfg.gpu_memory_utilization,
                               max_logprobs=max(cfg.top_logprobs, 20))

    def _run(self, prompts: Sequence[Prompt | SlotPrompt], params, inputs: list | None = None) -> list:
        """Run `prompts` (or `inputs`, the engine's inputs for them, e.g. token ids) sorted by text."""
        t0 = time.perf_counter()
        order = sorted(range(len(prompts)), key=lambda i: prompts[i].text)
        inputs = inputs or [p.text for p in prompts]
        outs = self.engine.generate([inputs[i] for i in order], params, use_tqdm=False)
        result: list = [None] * len(prompts)
        for i, o in zip(order, outs):
            result[i] = o
            self.usage.add(tokens_in=len(o.prompt_token_ids or []), tokens_out=len(o.outputs[0].token_ids),
                           tokens_in_cached=int(getattr(o, "num_cached_tokens", 0) or 0))
        self.usage.add(calls=1, prompts=len(prompts), seconds=time.perf_counter() - t0)
        return result

    def _generate(self, prompts: list[Prompt], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        outs = self._run(prompts, params)
        self.last_tokens = [(len(o.prompt_token_ids or []), len(o.outputs[0].token_ids)) for o in outs]
        return [o.outputs[0].text for o in outs]

    @staticmethod
    def _as_dict(entry, k: int) -> dict[str, float] | None:
        """{token text: logprob} of a vLLM logprobs entry ({token id: Logprob}), its top k only (a prompt
        logprobs entry also holds the prompt's own token, whatever its rank)."""
        if entry is None:
            return None
        d: dict[str, float] = {}
        for tid, lp in entry.items():
            rank = getattr(lp, "rank", None)
            if rank is not None and rank > k:
                continue
            merge_logprob(d, lp.decoded_token if lp.decoded_token is not None else str(tid), float(lp.logprob))
        return d

    def _slot_logprobs(self, prompts: list[SlotPrompt], k: int) -> list[list[dict[str, float] | None]]:
        tok = self.engine.get_tokenizer()
        special = self.cfg.chat_format == "none"

        def encode(text: str, first: bool) -> list[int]:
            return list(tok(text, add_special_tokens=first and special)["input_ids"])

        parts = [slot_token_ids(p, encode) for p in prompts]
        inputs = [{"prompt_token_ids": pre + suf} for pre, suf, _ in parts]
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, prompt_logprobs=k)
        out = []
        for (pre, suf, cols), o in zip(parts, self._run(prompts, params, inputs)):
            n, plp = len(pre) + len(suf), o.prompt_logprobs or []
            gen = (o.outputs[0].logprobs or [None])[0]
            out.append([self._as_dict(plp[len(pre) + c + 1] if len(pre) + c + 1 < n else gen, k) for c in cols])
        return out

    def _top_logprobs(self, prompts: list[Prompt], k: int) -> list[dict[str, float]]:
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=k)
        out = []
        for o in self._run(prompts, params):
            d: dict[str, float] = {}
            first = (o.outputs[0].logprobs or [{}])[0]
            for tid, lp in first.items():
                text = lp.decoded_token if lp.decoded_token is not None else str(tid)
                merge_logprob(d, text, float(lp.logprob))
            out.append(d)
        return out
