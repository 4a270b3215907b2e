"""The `transformers` backend: a local HF causal LM on CPU or CUDA.

`top_logprobs` groups prompts by prefix, runs each distinct prefix once (up to `batch_size`
prefixes per forward pass), and feeds each prefix's suffixes in batches (sorted by length,
right-padded); the LM head runs only where a distribution is read. `share_prefix=False` runs
every prompt alone from scratch (the reference the tests and the benchmark compare against).

Shared-prefix (cascade) attention, the Hydragen idea (Juravsky et al. 2024), is the suffix pass's
attention for the Llama and GPT-NeoX families (`CASCADE_MODELS`): the prefix's keys/values are kept
once, [1, kv heads, P, d], and never repeated per suffix row. In every layer the suffix queries of the
whole batch (and the query heads of one key/value group) are folded into one query dimension and
attend to the prefix in a single non-causal attention call; each row's queries attend to its own
suffix causally in a second call (grouped-query heads native, no `repeat_kv`); the two partial
softmaxes are merged exactly by their log-sum-exps. Both calls are torch SDPA kernels that return
the log-sum-exp (`attention_lse`). Other model families fall back to a broadcast view of the prefix
KV cache, which the model's first cache update materialises once per batch (`cascade = False` forces
that path: the benchmark's "broadcast cache" column).

`slot_logprobs` (the all-at-once simulator) reads the next-token distribution at many positions of
one prompt in the same passes: the prefix (instructions + explanation) once per group, the suffixes
(a sentence written one token per line with activation slots) batched on it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections import defaultdict
from typing import Any, cast

import torch

from . import LLM, Prompt, SlotPrompt, merge_logprob, slot_token_ids

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


CASCADE_MODELS = ("llama", "gpt_neox")
"""Model types whose suffix pass runs the shared-prefix (cascade) attention: their attention layers call
the registered attention function with [batch, heads, length, head dim] queries and keys, and their
causal-LM head is the output embedding applied to the base model's last hidden state."""
ATTENTION_NAME = "nlrewrite_shared_prefix"


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention of q [B, H, Lq, d] over k, v [B, Hkv, Lk, d] (Hkv divides H: grouped
    query heads handled by the kernel), returning (output [B, H, Lq, d], log-sum-exp of the scores
    [B, H, Lq], float32). `causal` is the top-left causal mask (used only with Lq == Lk). A torch SDPA
    kernel that returns the log-sum-exp: the CPU flash kernel, CUDA's flash kernel in half precision,
    CUDA's memory-efficient kernel in float32 (which needs equal head counts: k, v expanded then)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    if k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = (x.repeat_interleave(g, dim=1) for x in (k, v))
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                                                 None, True, 0.0, causal, scale=scale)
    return res[0], res[1][..., :q.shape[2]]


def cascade_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """Attention of suffix queries q [B, H, S, d] over one shared prefix (pk, pv [1, Hkv, P, d]) followed
    by each row's own suffix (k, v [B, Hkv, S, d], causal), as [B, S, H, d]. The prefix part is one
    non-causal call with the batch and the G = H / Hkv query heads of each key/value head folded into
    the query dimension ([1, Hkv, G*B*S, d]: the prefix is read once, never repeated per row); the
    suffix part is the usual causal attention; the two are merged by their log-sum-exps."""
    B, H, S, d = q.shape
    hkv = pk.shape[1]
    g = H // hkv
    qf = q.reshape(B, hkv, g, S, d).permute(1, 2, 0, 3, 4).reshape(1, hkv, g * B * S, d)
    out_p, lse_p = attention_lse(qf, pk, pv, False, scale)
    out_p = out_p.reshape(hkv, g, B, S, d).permute(2, 0, 1, 3, 4).reshape(B, H, S, d)
    lse_p = lse_p.reshape(hkv, g, B, S).permute(2, 0, 1, 3).reshape(B, H, S)
    out_s, lse_s = attention_lse(q, k, v, True, scale)
    lse = torch.logaddexp(lse_p, lse_s)
    w_p, w_s = (torch.exp(x - lse).unsqueeze(-1) for x in (lse_p, lse_s))
    out = (out_p.float() * w_p + out_s.float() * w_s).to(q.dtype)
    return out.transpose(1, 2).contiguous()


def _shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             shared_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """The attention function registered as ATTENTION_NAME: cascade attention over the layer's entry of
    `shared_prefix` (the prefix keys/values of each layer, passed through the model's forward)."""
    if shared_prefix is None:
        raise RuntimeError(f"{ATTENTION_NAME} attention needs the shared_prefix keyword")
    pk, pv = shared_prefix[cast(int, module.layer_idx)]
    return cascade_attention(query, key, value, pk, pv, scaling), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _shared_prefix_attention)


def prefix_kv(cache, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's keys and values of row `row` of a (right-padded) prefix cache, its first `length`
    positions, as contiguous [1, Hkv, length, d] tensors (one copy per prefix, not per suffix row)."""
    return [(layer.keys[row:row + 1, :, :length].contiguous(), layer.values[row:row + 1, :, :length].contiguous())
            for layer in cache.layers]


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Replace the forward of the model's RMSNorm modules (Llama's: a `weight` and a `variance_epsilon`)
    with torch's `rms_norm` (one fused kernel on CUDA), computed in float32 like the original and cast
    back before the weight, as the original does. Returns how many were replaced."""
    import types

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.variance_epsilon)
        return self.weight * y.to(x.dtype)

    n = 0
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight"):
            m.forward = types.MethodType(forward, m)
            n += 1
    return n


def filled(out: list[dict[str, float] | None]) -> list[dict[str, float]]:
    """`out` once every prompt's slot holds its distribution (an empty one stays a bug, not a None)."""
    missing = [i for i, o in enumerate(out) if o is None]
    if missing:
        raise RuntimeError(f"no distribution computed for prompts {missing[:5]} of {len(out)}")
    return cast(list[dict[str, float]], out)


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
        # transformers declares PreTrainedModel.to with @wraps(Module.to), which mypy reads as unbound
        self.model = (model or AutoModelForCausalLM.from_pretrained(cfg.model, dtype=self.dtype)).to(self.device).eval()  # type: ignore[arg-type]
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
        self.cascade = getattr(self.model.config, "model_type", "") in CASCADE_MODELS
        """Suffix passes use the shared-prefix (cascade) attention; else a broadcast view of the prefix cache."""
        if self.cascade:
            _register_attention()
            fuse_rms_norms(self.model)

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

    def slot_ids(self, p: SlotPrompt) -> tuple[list[int], list[int], list[int]]:
        """(prefix ids, suffix ids, slot columns) of a slot prompt (`slot_token_ids`)."""
        return slot_token_ids(p, self.ids)

    def _decode(self, ids: list[int], **kw: Any) -> str:
        """The text of one sequence of token ids (the tokenizer returns a list only for a batch)."""
        return cast(str, self.tokenizer.decode(ids, **kw))

    def _vocab(self) -> list[str]:
        """Every vocabulary id's text, decoded once."""
        if self._vocab_text is None:
            self._vocab_text = [self._decode([t]) for t in range(len(self.tokenizer))]
        return self._vocab_text

    def token_text(self, i: int) -> str:
        texts = self._vocab()
        return texts[i] if i < len(texts) else self._decode([i])

    def _top(self, logits: torch.Tensor, k: int) -> list[dict[str, float]]:
        lp = torch.log_softmax(logits.float(), dim=-1)
        vals, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)
        out = []
        texts = self._vocab()
        n = len(texts)
        for v_row, i_row in zip(vals.tolist(), idx.tolist()):
            d: dict[str, float] = {}
            for v, i in zip(v_row, i_row):
                t = texts[i] if i < n else self._decode([i])
                if t in d:
                    merge_logprob(d, t, v)
                else:
                    d[t] = v
            out.append(d)
        return out

    # ---- logprobs -------------------------------------------------------------------------------
    def _last_logits(self, ids: list[list[int]] | torch.Tensor, lens: list[int], **kw) -> tuple[torch.Tensor, Any]:
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

    HEAD_ROWS = 1024
    """Positions whose LM-head logits are computed at a time (bounds [rows, vocab] in memory)."""

    def _tops_at(self, seqs: list[list[int]], rows: list[int], cols: list[int], k: int, pre_len: int = 0,
                 cache=None, cache_row: int = 0, kv: list | None = None) -> list[dict[str, float]]:
        """One forward pass of the right-padded token rows `seqs` (after a prefix of `pre_len` tokens: row
        `cache_row` of the prefix pass's `cache`, and `kv`, its per-layer keys/values for the cascade
        attention), and the top-k next-token logprobs after token (rows[i], cols[i]) for each i. No
        attention mask: a causal model's real tokens never attend to the pads after them."""
        B, L = len(seqs), max(map(len, seqs))
        ids = torch.tensor([x + [self.pad_id] * (L - len(x)) for x in seqs], dtype=torch.long, device=self.device)
        kw: dict = {"position_ids": (pre_len + torch.arange(L, device=self.device)).expand(B, L)}
        r, c = torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)
        if not self.cascade:
            if pre_len:
                kw.update({self._cache_kw: _expanded(cache, cache_row, pre_len, B), "use_cache": True})
            if self._logits_to_keep:
                kw["logits_to_keep"], c = torch.unique(c, return_inverse=True)
            return self._top(self.model(input_ids=ids, **kw).logits[r, c], k)
        kw["use_cache"] = False
        if pre_len:
            kw["shared_prefix"] = kv
        with self._attention(ATTENTION_NAME if pre_len else None):
            hidden = self.model.base_model(input_ids=ids, **kw).last_hidden_state[r, c]
        head = self.model.get_output_embeddings()
        out: list[dict[str, float]] = []
        for a in range(0, len(hidden), self.HEAD_ROWS):
            out += self._top(head(hidden[a:a + self.HEAD_ROWS]), k)
        return out

    @contextlib.contextmanager
    def _attention(self, name: str | None):
        """The model's attention implementation set to `name` (None: unchanged) inside the block."""
        if name is None:
            yield
            return
        config = self.model.config
        before = config._attn_implementation
        config._attn_implementation = name
        try:
            yield
        finally:
            config._attn_implementation = before

    def _prefix_passes(self, prefixes: list[str]):
        """For each distinct prefix, in order: (prefix, its ids, prefix cache, its row there, the prefix
        pass's last logits, its per-layer keys/values for the cascade attention or None). Up to
        `batch_size` prefixes share one right-padded forward pass (no attention mask: with a causal model
        a real token never attends to the pads after it); each keeps its own row of the cache."""
        bs = self.cfg.batch_size
        for a in range(0, len(prefixes), bs):
            pres = [self.ids(prefix, True) for prefix in prefixes[a:a + bs]]
            cache, pre_logits = None, None
            if any(pres):
                width = max(map(len, pres))
                pre_logits, res = self._last_logits([x + [self.pad_id] * (width - len(x)) for x in pres],
                                                    [max(len(x), 1) for x in pres], use_cache=True)
                cache = res.cache if "cache" in type(res).__dataclass_fields__ else res.past_key_values
                self.usage.add(calls=1)
            for row, (pre, prefix) in enumerate(zip(pres, prefixes[a:a + bs])):
                kv = prefix_kv(cache, row, len(pre)) if pre and self.cascade else None
                yield prefix, pre, cache, row, pre_logits, kv

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
            return filled(out)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            groups[p.prefix].append(i)
        for prefix, pre, cache, row, pre_logits, kv in self._prefix_passes(list(groups)):
            self._suffixes(prompts, groups[prefix], pre, cache, row, pre_logits, kv, k, out)
        self.usage.add(prompts=len(prompts), seconds=time.perf_counter() - t0)
        return filled(out)

    def _suffixes(self, prompts: list[Prompt], members: list[int], pre: list[int], cache, row: int,
                  pre_logits: torch.Tensor | None, kv: list | None, k: int, out: list) -> None:
        """Fill `out` for the prompts `members` that share the prefix tokens `pre` (row `row` of the
        prefix batch's `cache` and `pre_logits`; `kv`: its keys/values for the cascade attention): their
        suffixes in batches sorted by length."""
        sufs = {i: self.ids(prompts[i].suffix, not pre) for i in members}
        empty = [i for i in members if not sufs[i]]
        if empty:
            if not pre or pre_logits is None:
                raise ValueError("an empty prompt has no next-token distribution")
            top = self._top(pre_logits[row:row + 1], k)[0]
            for i in empty:
                out[i] = dict(top)
        rest = sorted((i for i in members if sufs[i]), key=lambda i: len(sufs[i]))
        bs, P = self.cfg.batch_size, len(pre)
        for a in range(0, len(rest), bs):
            batch = rest[a:a + bs]
            seqs = [sufs[i] for i in batch]
            tops = self._tops_at(seqs, list(range(len(batch))), [len(x) - 1 for x in seqs], k, P, cache, row, kv)
            for i, d in zip(batch, tops):
                out[i] = d
            self.usage.add(tokens_in=sum(map(len, seqs)), calls=1)
        self.usage.add(tokens_in=P * len(members), tokens_in_cached=P * (len(members) - 1), tokens_out=len(members))

    @torch.inference_mode()
    def _slot_logprobs(self, prompts: list[SlotPrompt], k: int, share_prefix: bool = True
                       ) -> list[list[dict[str, float] | None]]:
        """Top-k logprobs at every slot of every prompt (see `slot_ids` for the slots' positions). Prompts
        sharing a prefix run it once and their suffixes in batches on it; `share_prefix=False` runs each
        prompt whole, alone (the reference)."""
        t0 = time.perf_counter()
        out: list[list[dict[str, float] | None]] = [[] for _ in prompts]
        if not share_prefix:
            for i, p in enumerate(prompts):
                pre, suf, cols = self.slot_ids(p)
                out[i] = list(self._tops_at([pre + suf], [0] * len(cols), [len(pre) + c for c in cols], k))
                self.usage.add(tokens_in=len(pre) + len(suf), calls=1)
            self.usage.add(prompts=len(prompts), seconds=time.perf_counter() - t0)
            return out
        groups: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            groups[p.prefix].append(i)
        bs = self.cfg.batch_size
        for prefix, pre, cache, row, _, kv in self._prefix_passes(list(groups)):
            if not pre:
                raise ValueError("slot prompts need a prefix (the instructions and the explanation)")
            members = groups[prefix]
            parts = {i: self.slot_ids(prompts[i])[1:] for i in members}
            order = sorted(members, key=lambda i: len(parts[i][0]))
            for a in range(0, len(order), bs):
                batch = order[a:a + bs]
                rows = [r for r, i in enumerate(batch) for _ in parts[i][1]]
                cols = [c for i in batch for c in parts[i][1]]
                tops = self._tops_at([parts[i][0] for i in batch], rows, cols, k, len(pre), cache, row, kv)
                for i in batch:
                    n = len(parts[i][1])
                    out[i], tops = list(tops[:n]), tops[n:]
                self.usage.add(tokens_in=sum(len(parts[i][0]) for i in batch), calls=1)
            self.usage.add(tokens_in=len(pre) * len(members), tokens_in_cached=len(pre) * (len(members) - 1))
        self.usage.add(prompts=len(prompts), tokens_out=sum(map(len, out)), seconds=time.perf_counter() - t0)
        return out

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
                out[i] = self._decode(toks, skip_special_tokens=True)
                self.usage.add(tokens_in=len(all_ids[i]), tokens_out=len(toks))
                self.last_tokens[i] = (len(all_ids[i]), len(toks))
        self.usage.add(calls=-(-len(order) // bs), prompts=len(prompts), seconds=time.perf_counter() - t0)
        return out
