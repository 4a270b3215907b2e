"""The `vllm` backend: the offline vllm.LLM engine with automatic prefix caching.

vLLM is an optional extra (`pip install nlrewrite[vllm]`), imported only when this backend is
built. Prompts are sent sorted by text so that those sharing a prefix are adjacent (the prefix
cache then holds each shared block once); answers come back in the caller's order.
"""

from __future__ import annotations

import time

from . import LLM, LLMError, Prompt, merge_logprob


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

    def _run(self, prompts: list[Prompt], params) -> list:
        t0 = time.perf_counter()
        order = sorted(range(len(prompts)), key=lambda i: prompts[i].text)
        outs = self.engine.generate([prompts[i].text for i in order], params, use_tqdm=False)
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
