"""The `transformers` backend: a local HF causal LM on CPU or CUDA.

`top_logprobs` groups prompts by prefix, runs each distinct prefix once (up to `batch_size`
prefixes per forward pass), and feeds each prefix's suffixes in batches (sorted by length,
right-padded) on a view of the prefix's KV cache repeated over the batch: the shared tokens are
computed once, not once per prompt, and the LM head runs only at each prompt's last token.
`share_prefix=False` runs every prompt alone from scratch (the reference the tests and the
benchmark compare against).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections import defaultdict

import torch

from . import LLM, Prompt, merge_logprob

log = logging.getLogger(__name__)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def _expanded(cache, row: int, length: int, batch: int):
    """Row `row` of a (right-padded) prefix cache, cut to its first `length` positions, seen as `batch`
    rows. Plain dynamic layers become broadcast views of their keys/values, which the model's first
    cache update (a concatenation with the suffix's keys/values) materializes once; other caches
    are copied through the Cache API."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(x, "keys") and not hasattr(x, "cumulative_length") for x in layers):
        c = copy.deepcopy(cache)
        c.batch_select_indices(torch.tensor([row]))
        c.crop(length)
        c.batch_repeat_interleave(batch)
        return c
    c = copy.copy(cache)
    c.layers = []
    for layer in layers:
        new = copy.copy(layer)
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            new.keys = layer.keys[row:row + 1, :, :length].expand(batch, -1, -1, -1)
            new.values = layer.values[row:row + 1, :, :length].expand(batch, -1, -1, -1)
        c.layers.append(new)
    return c


class TransformersLLM(LLM):
    backend = "transformers"

    def __init__(self, cfg, model=None, tokenizer=None):
        super().__init__(cfg)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if os.path.isdir(cfg.model):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.device = _resolve_device(cfg.device)
        self.dtype = _resolve_dtype(cfg.dtype, self.device)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.model)
        self.model = (model or AutoModelForCausalLM.from_pretrained(cfg.model, dtype=self.dtype)).to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self._ids_cache: dict[tuple[str, bool], list[int]] = {}
        self._vocab_text: list[str] | None = None
        import inspect

        # transformers 5.2x renames forward's `past_key_values` to `cache`; older ones only know the first.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params

    # ---- tokens ---------------------------------------------------------------------------------
    def ids(self, text: str, first: bool) -> list[int]:
        """Token ids of a prefix (first=True: the tokenizer's special start tokens added, unless
        the chat format writes them) or of a suffix (no special tokens)."""
        key = (text, first)
        if key not in self._ids_cache:
            special = first and self.cfg.chat_format == "none"
            ids = self.tokenizer(text, add_special_tokens=special)["input_ids"] if text else []
            if len(self._ids_cache) > 100_000:
                self._ids_cache.clear()
            self._ids_cache[key] = list(ids)
        return self._ids_cache[key]

    def token_text(self, i: int) -> str:
        if self._vocab_text is None:
            self._vocab_text = [self.tokenizer.decode([t]) for t in range(len(self.tokenizer))]
        return self._vocab_text[i] if i < len(self._vocab_text) else self.tokenizer.decode([i])

    def _top(self, logits: torch.Tensor, k: int) -> list[dict[str, float]]:
        lp = torch.log_softmax(logits.float(), dim=-1)
        vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)
        out = []
        self.token_text(0)
        texts = self._vocab_text
        n = len(texts)
        for v_row, i_row in zip(vals.tolist(), idx.tolist()):
            d: dict[str, float] = {}
            for v, i in zip(v_row, i_row):
                t = texts[i] if i < n else self.tokenizer.decode([i])
                if t in d:
                    merge_logprob(d, t, v)
                else:
                    d[t] = v
            out.append(d)
        return out

    # ---- logprobs -------------------------------------------------------------------------------
    def _last_logits(self, ids: list[list[int]] | torch.Tensor, lens: list[int], **kw) -> tuple[torch.Tensor, object]:
        """One forward pass of right-padded `ids` [B, L]: (the next-token logits [B, V] after each row's
        last real token, row r's lens[r]-th; the model output). The LM head runs only at those positions
        when the model's forward takes `logits_to_keep` (a 1-D tensor of the batch's distinct last positions)."""
        ids = torch.as_tensor(ids, dtype=torch.long).to(self.device)
        last = torch.tensor(lens, device=self.device) - 1
        if self._logits_to_keep:
            keep, last = torch.unique(last, return_inverse=True)
            kw["logits_to_keep"] = keep
        res = self.model(input_ids=ids, **kw)
        return res.logits[torch.arange(len(lens), device=self.device), last], res

    @torch.inference_mode()
    def _top_logprobs(self, prompts: list[Prompt], k: int, share_prefix: bool = True) -> list[dict[str, float]]:
        t0 = time.perf_counter()
        out: list[dict[str, float] | None] = [None] * len(prompts)
        if not share_prefix:
            for i, p in enumerate(prompts):
                ids = self.ids(p.prefix, True) + self.ids(p.suffix, not p.prefix)
                out[i] = self._top(self._last_logits([ids], [len(ids)])[0], k)[0]
                self.usage.add(tokens_in=len(ids), tokens_out=1)
            self.usage.add(calls=len(prompts), prompts=len(prompts), seconds=time.perf_counter() - t0)
            return out  # type: ignore[return-value]
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            groups[p.prefix].append(i)
        prefixes, bs, calls = list(groups), self.cfg.batch_size, 0
        for a in range(0, len(prefixes), bs):
            # Up to `bs` prefixes in one right-padded forward pass (no attention mask: with a causal
            # model a real token never attends to the pads after it); each keeps its own row's cache.
            pres = [self.ids(prefix, True) for prefix in prefixes[a:a + bs]]
            cache, pre_logits = None, None
            if any(pres):
                width = max(map(len, pres))
                pre_logits, res = self._last_logits([x + [self.pad_id] * (width - len(x)) for x in pres],
                                                    [max(len(x), 1) for x in pres], use_cache=True)
                cache = res.cache if "cache" in type(res).__dataclass_fields__ else res.past_key_values
                calls += 1
            for row, (pre, prefix) in enumerate(zip(pres, prefixes[a:a + bs])):
                calls += self._suffixes(prompts, groups[prefix], pre, cache, row, pre_logits, k, out)
        self.usage.add(calls=calls, prompts=len(prompts), seconds=time.perf_counter() - t0)
        return out  # type: ignore[return-value]

    def _suffixes(self, prompts: list[Prompt], members: list[int], pre: list[int], cache, row: int,
                  pre_logits: torch.Tensor | None, k: int, out: list) -> int:
        """Fill `out` for the prompts `members` that share the prefix tokens `pre` (row `row` of the
        prefix batch's `cache` and `pre_logits`): their suffixes in batches sorted by length, right
        padded, with no attention mask (exact for a causal model). Returns the forward passes run."""
        sufs = {i: self.ids(prompts[i].suffix, not pre) for i in members}
        empty = [i for i in members if not sufs[i]]
        if empty:
            if not pre:
                raise ValueError("an empty prompt has no next-token distribution")
            top = self._top(pre_logits[row:row + 1], k)[0]
            for i in empty:
                out[i] = dict(top)
        rest = sorted((i for i in members if sufs[i]), key=lambda i: len(sufs[i]))
        bs, P = self.cfg.batch_size, len(pre)
        for a in range(0, len(rest), bs):
            batch = rest[a:a + bs]
            lens = [len(sufs[i]) for i in batch]
            L, B = max(lens), len(batch)
            ids = [sufs[i] + [self.pad_id] * (L - n) for i, n in zip(batch, lens)]
            kw = {self._cache_kw: _expanded(cache, row, P, B)} if pre else {}
            pos = (P + torch.arange(L, device=self.device)).expand(B, L)
            last, _ = self._last_logits(ids, lens, position_ids=pos, use_cache=bool(pre), **kw)
            for i, d in zip(batch, self._top(last, k)):
                out[i] = d
            self.usage.add(tokens_in=sum(lens))
        self.usage.add(tokens_in=P * len(members), tokens_in_cached=P * (len(members) - 1), tokens_out=len(members))
        return -(-len(rest) // bs)

    # ---- generation -----------------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, prompts: list[Prompt], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        t0 = time.perf_counter()
        all_ids = [self.ids(p.prefix, True) + self.ids(p.suffix, not p.prefix) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(all_ids[i]))
        out = [""] * len(prompts)
        self.last_tokens = [(0, 0)] * len(prompts)
        eos = self.tokenizer.eos_token_id
        bs = self.cfg.batch_size
        if temperature > 0:
            torch.manual_seed(seed)
        for a in range(0, len(order), bs):
            batch = order[a:a + bs]
            L = max(len(all_ids[i]) for i in batch)
            ids = torch.full((len(batch), L), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for r, i in enumerate(batch):  # left padding: every answer starts at column L
                n = len(all_ids[i])
                ids[r, L - n:] = torch.tensor(all_ids[i])
                mask[r, L - n:] = 1
            kw = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=eos,
                                      top_k=None, top_p=None, **kw)
            new = gen[:, L:].tolist()
            for r, i in enumerate(batch):
                toks = new[r]
                if eos is not None and eos in toks:
                    toks = toks[:toks.index(eos)]
                out[i] = self.tokenizer.decode(toks, skip_special_tokens=True)
                self.usage.add(tokens_in=len(all_ids[i]), tokens_out=len(toks))
                self.last_tokens[i] = (len(all_ids[i]), len(toks))
        self.usage.add(calls=-(-len(order) // bs), prompts=len(prompts), seconds=time.perf_counter() - t0)
        return out
