"""The `openai` backend: any OpenAI-compatible completions endpoint (`vllm serve`, hosted APIs).

Requests go to {base_url}/completions, one prompt each, at most `max_concurrency` in flight
(asyncio + httpx). A 429, a 5xx, a timeout or a connection error is retried up to `max_retries`
times with exponential backoff and jitter (a Retry-After header wins); then an LLMError names the
URL, the status and the attempts. The API key is read from the environment variable
`api_key_env` at each call and only ever placed in the Authorization header: it is not stored on
the object, not logged, and scrubbed from every error message.

`slot_logprobs` (the all-at-once simulator) sends each prompt with `echo: true` and `logprobs: k`:
the server returns, for every prompt token, its character offset (`text_offset`) and the top-k
distribution at it; a slot is the token that starts at the slot's character offset (the one
generated token for a slot at the very end). A slot with no token starting there (the server's
tokenizer merged across it, or reports offsets that do not match the prompt's characters) is None:
a failed prediction, never a neighbour's distribution.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import time
from typing import Any

from . import LLM, LLMError, Prompt, SlotPrompt, merge_logprob

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def _run(coro):
    """Run a coroutine to completion from sync code, also when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


class OpenAILLM(LLM):
    backend = "openai"

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.base_url:
            raise ValueError("llm.base_url is required for the openai backend (e.g. http://127.0.0.1:8000/v1)")
        self.url = cfg.base_url.rstrip("/") + "/completions"
        self.max_in_flight = 0  # the most requests seen in flight at once (checked by the tests)

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.cfg.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _scrub(self, text: str) -> str:
        key = os.environ.get(self.cfg.api_key_env)
        return text.replace(key, "***") if key else text

    async def _post(self, client, sem: asyncio.Semaphore, body: dict[str, Any], state: dict[str, int]) -> dict:
        import httpx

        attempts = self.cfg.max_retries + 1
        last = ""
        for attempt in range(attempts):
            async with sem:
                state["now"] += 1
                self.max_in_flight = max(self.max_in_flight, state["now"])
                try:
                    r = await client.post(self.url, json=body, headers=self._headers())
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                    if status == 200:
                        try:
                            return r.json()
                        except ValueError:
                            raise LLMError(f"openai: {self.url} answered 200 with a body that is not JSON") from None
                    last = f"HTTP {status}"
                    if status not in RETRY_STATUS:
                        raise LLMError(self._scrub(f"openai: {self.url} answered HTTP {status}: {r.text[:300]}"))
                except httpx.TimeoutException:
                    status, retry_after = None, None
                    last = f"timed out after {self.cfg.timeout_s:g}s"
                except httpx.TransportError as e:
                    status, retry_after = None, None
                    last = f"connection error ({type(e).__name__})"
                finally:
                    state["now"] -= 1
            if attempt + 1 < attempts:
                self.usage.add(retries=1)
                delay = self.cfg.backoff_s * 2 ** attempt * (0.5 + random.random() / 2)
                if retry_after:
                    try:
                        delay = max(delay, min(float(retry_after), 60.0))
                    except ValueError:
                        pass
                log.warning("openai: %s %s, retry %d of %d in %.2fs", self.url, last, attempt + 1,
                            self.cfg.max_retries, delay)
                await asyncio.sleep(delay)
        raise LLMError(self._scrub(f"openai: request to {self.url} failed after {attempts} attempts: {last}"))

    async def _all(self, bodies: list[dict[str, Any]]) -> list[dict]:
        import httpx

        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        state = {"now": 0}
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        async with httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits) as client:
            return await asyncio.gather(*(self._post(client, sem, b, state) for b in bodies))

    def _call(self, prompts: list[Prompt], **params: Any) -> list[dict]:
        t0 = time.perf_counter()
        bodies = [{"model": self.cfg.model, "prompt": p.text, **params} for p in prompts]
        results = _run(self._all(bodies))
        for res in results:
            u = res.get("usage") or {}
            self.usage.add(tokens_in=int(u.get("prompt_tokens") or 0), tokens_out=int(u.get("completion_tokens") or 0))
        self.usage.add(calls=len(prompts), prompts=len(prompts), seconds=time.perf_counter() - t0)
        return results

    @staticmethod
    def _choice(res: dict) -> dict:
        ch = res.get("choices") or [{}]
        return ch[0] if isinstance(ch[0], dict) else {}

    def _generate(self, prompts: list[Prompt], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        results = self._call(prompts, max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        self.last_tokens = [(int((r.get("usage") or {}).get("prompt_tokens") or 0),
                             int((r.get("usage") or {}).get("completion_tokens") or 0)) for r in results]
        return [str(self._choice(r).get("text") or "") for r in results]

    def _top_logprobs(self, prompts: list[Prompt], k: int) -> list[dict[str, float]]:
        results = self._call(prompts, max_tokens=1, temperature=0.0, logprobs=k)
        out = []
        for r in results:
            lp = self._choice(r).get("logprobs") or {}
            top = (lp.get("top_logprobs") or [None])[0] or {}
            d: dict[str, float] = {}
            if isinstance(top, dict):
                for t, v in top.items():
                    if isinstance(v, (int, float)):
                        merge_logprob(d, str(t), float(v))
            out.append(d)
        return out

    @staticmethod
    def _as_dict(top: Any) -> dict[str, float] | None:
        if not isinstance(top, dict):
            return None
        d: dict[str, float] = {}
        for t, v in top.items():
            if isinstance(v, (int, float)):
                merge_logprob(d, str(t), float(v))
        return d

    def _slot_logprobs(self, prompts: list[SlotPrompt], k: int) -> list[list[dict[str, float] | None]]:
        results = self._call(prompts, max_tokens=1, temperature=0.0, logprobs=k, echo=True)  # type: ignore[arg-type]
        out = []
        for p, r in zip(prompts, results):
            lp = self._choice(r).get("logprobs") or {}
            offs, toks, tops = (lp.get(x) or [] for x in ("text_offset", "tokens", "top_logprobs"))
            text = p.text
            at: dict[int, int] = {}
            for j, o in enumerate(offs):
                if isinstance(o, int) and o not in at:
                    at[o] = j
            row: list[dict[str, float] | None] = []
            for c in p.offsets():
                j = at.get(c)
                tok = toks[j] if j is not None and j < len(toks) else None
                # the token found must be the prompt's text at the slot (the generated one at the end)
                ok = j is not None and j < len(tops) and isinstance(tok, str) and (c == len(text) or text.startswith(tok, c))
                row.append(self._as_dict(tops[j]) if ok else None)
            out.append(row)
        return out
