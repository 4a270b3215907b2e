"""The `openai` backend: any OpenAI-compatible completions endpoint (`vllm serve`, hosted APIs).

Requests go to {base_url}/completions, one prompt each, at most `max_concurrency` in flight
(asyncio + httpx). A 429, a 5xx, a timeout or a connection error is retried up to `max_retries`
times with exponential backoff and jitter (a Retry-After header wins); then an LLMError names the
URL, the status, the attempts, a scrubbed excerpt of the last body and the failures of the call by
kind. Each failure kind is logged once per call (then counted), and the first request that fails
for good cancels the rest of its call. The API key is read from the environment variable
`api_key_env` at each call and only ever placed in the Authorization header: it is not stored on
the object, not logged, and scrubbed (with any Authorization/Bearer value, `redact.scrub`) from
every response body before the body is cut, logged or raised, and from every generated answer.

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
import contextlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..redact import excerpt, scrub
from . import LLM, LLMError, Prompt, SlotPrompt, merge_logprob

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
ERROR_EXCERPT = 300
"""Characters of a scrubbed response body kept in a log line or an error."""


@dataclass
class _Batch:
    """The requests of one call: how many are in flight, and their failures by kind ("HTTP 503",
    "connection error (ConnectError)"...). Each kind is logged once, when first seen; later ones
    are only counted, and the counts close the call's log line or error (issue 12: an unreachable
    endpoint printed one warning per request and retry, 1,524 lines)."""

    in_flight: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def failed(self, kind: str, detail: str, url: str, retrying: bool) -> None:
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            log.warning("openai: %s: %s%s; %s (further failures of this kind in this call are counted, not "
                        "logged)", url, kind, f" ({detail})" if detail else "",
                        "retrying with backoff" if retrying else "no retries left")

    def summary(self, prefix: bool = True) -> str:
        text = ", ".join(f"{kind} x{n}" for kind, n in self.counts.most_common())
        if not prefix:
            return f"retried failures: {text}"
        return f" [failures in this call: {text}]" if text else ""


def _run(coro):
    """Run a coroutine to completion from sync code, also when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:  # this thread runs a loop: run ours in another thread
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, coro).result()
    # Outside the except block, so that an error does not carry "no running event loop" as its context.
    return asyncio.run(coro)


class OpenAILLM(LLM):
    backend = "openai"

    def __init__(self, cfg):
        super().__init__(cfg)
        if not cfg.base_url:  # the config refuses this up front; kept for LLMConfig.model_construct
            raise LLMError("llm.base_url is required for the openai backend (e.g. http://127.0.0.1:8000/v1)")
        self.url = cfg.base_url.rstrip("/") + "/completions"
        self.max_in_flight = 0  # the most requests seen in flight at once (checked by the tests)

    def _key(self) -> str | None:
        return os.environ.get(self.cfg.api_key_env) or None

    def _headers(self) -> dict[str, str]:
        key = self._key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _scrub(self, text: str) -> str:
        """Remote text without the key (or a piece of it) and without any Authorization/Bearer value."""
        return scrub(text, [self._key()])

    def _excerpt(self, text: str) -> str:
        """A scrubbed one-line excerpt of a response body (scrubbed first, then cut)."""
        return excerpt(text, ERROR_EXCERPT, [self._key()])

    async def _post(self, client, sem: asyncio.Semaphore, body: dict[str, Any], batch: _Batch) -> dict:
        import httpx

        attempts = self.cfg.max_retries + 1
        last = ""
        for attempt in range(attempts):
            async with sem:
                batch.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, batch.in_flight)
                try:
                    r = await client.post(self.url, json=body, headers=self._headers())
                    status, retry_after = r.status_code, r.headers.get("retry-after")
                    if status == 200:
                        try:
                            return r.json()
                        except ValueError:
                            raise LLMError(f"openai: {self.url} answered 200 with a body that is not JSON") from None
                    last = f"HTTP {status}"
                    detail = self._excerpt(r.text)
                    if status not in RETRY_STATUS:
                        raise LLMError(f"openai: {self.url} answered HTTP {status}: {detail}"
                                       + batch.summary(), retryable=False)
                except httpx.TimeoutException:
                    status, retry_after, detail = None, None, ""
                    last = f"timed out after {self.cfg.timeout_s:g}s"
                except httpx.TransportError as e:
                    status, retry_after, detail = None, None, ""
                    last = f"connection error ({type(e).__name__})"
                finally:
                    batch.in_flight -= 1
            batch.failed(last, detail, self.url, retrying=attempt + 1 < attempts)
            if attempt + 1 < attempts:
                self.usage.add(retries=1)
                delay = self.cfg.backoff_s * 2 ** attempt * (0.5 + random.random() / 2)
                if retry_after:
                    with contextlib.suppress(ValueError):
                        delay = max(delay, min(float(retry_after), 60.0))
                await asyncio.sleep(delay)
        raise LLMError(f"openai: request to {self.url} failed after {attempts} attempts: {last}"
                       + (f" ({detail})" if detail else "") + batch.summary(), retryable=True)

    async def _all(self, bodies: list[dict[str, Any]]) -> list[dict]:
        """Every request of one call; the first request that fails for good fails the call and cancels
        the others (an unreachable endpoint costs one request's retries, not one per prompt)."""
        import httpx

        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        batch = _Batch()
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        async with httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits) as client:
            jobs = [asyncio.ensure_future(self._post(client, sem, b, batch)) for b in bodies]
            try:
                out = await asyncio.gather(*jobs)
            finally:
                for job in jobs:
                    job.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)
        if batch.counts:
            log.info("openai: %s: all %d requests answered after %s", self.url, len(bodies), batch.summary(False))
        return out

    def _call(self, prompts: Sequence[Prompt | SlotPrompt], **params: Any) -> list[dict]:
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
        # An answer is remote text that lands in artifacts and logs: a server that echoes the key gets it masked.
        return [self._scrub(str(self._choice(r).get("text") or "")) for r in results]

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
        results = self._call(prompts, max_tokens=1, temperature=0.0, logprobs=k, echo=True)
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
                t = at.get(c)
                tok = toks[t] if t is not None and t < len(toks) else None
                # the token found must be the prompt's text at the slot (the generated one at the end)
                ok = (t is not None and t < len(tops) and isinstance(tok, str)
                      and (c == len(text) or text.startswith(tok, c)))
                row.append(self._as_dict(tops[t]) if ok and t is not None else None)
            out.append(row)
        return out
