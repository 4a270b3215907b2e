"""The `ngram` explainer: an English sentence from a latent's activating examples.

Examples are sampled across activation-rank bins (as the paper samples across quantiles of the
top activations), and the sentence names the tokens the latent fires on and what precedes them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from .config import ExplainConfig

EXPLANATION_SCHEMA = pa.schema([
    ("latent", pa.int32()), ("status", pa.string()), ("explanation", pa.string()),
    ("explainer", pa.string()), ("model", pa.string()), ("prompt_sha", pa.string()),
    ("n_examples", pa.int32()), ("tokens_in", pa.int64()), ("tokens_out", pa.int64()),
])

TEMPLATE = "Fires on {tokens}{share}{prev}. Example: \u201c{example}\u201d."


def sample_across_bins(order: np.ndarray, n_examples: int, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Pick about n_examples indices from `order` (sorted by activation, descending), the same
    number from each of n_bins contiguous rank bins."""
    if len(order) <= n_examples:
        return order
    per_bin = max(1, n_examples // n_bins)
    picked = [rng.choice(b, size=min(per_bin, len(b)), replace=False)
              for b in np.array_split(order, min(n_bins, len(order))) if len(b)]
    return np.concatenate(picked)


def show_token(text: str) -> str:
    """A token's text as shown in an explanation (whitespace made visible)."""
    stripped = text.strip()
    if stripped:
        return stripped
    return "a newline" if "\n" in text else "a space"


def _quoted(items: list[str]) -> str:
    q = [f"\u201c{t}\u201d" for t in items]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def describe_latent(target_tokens: list[int], prev_tokens: list[int], example: str,
                    token_text: Callable[[int], str], cfg: ExplainConfig) -> str:
    """The explanation sentence for one latent, from its sampled examples."""
    counts = Counter(target_tokens)
    top = counts.most_common(cfg.n_tokens)
    shown = [show_token(token_text(t)) for t, _ in top]
    share = sum(c for _, c in top) / max(len(target_tokens), 1)
    share_text = f" ({share:.0%} of examples)" if share < 0.995 else ""
    prev = ""
    if cfg.n_prev and prev_tokens:
        prev_top = [show_token(token_text(t)) for t, _ in Counter(prev_tokens).most_common(cfg.n_prev)]
        prev = ", usually after " + _quoted(prev_top)
    return TEMPLATE.format(tokens=_quoted(shown), share=share_text, prev=prev, example=example.strip())


def ngram_explanations(seq_id: np.ndarray, pos: np.ndarray, latent: np.ndarray, act: np.ndarray,
                       tokens: dict[int, np.ndarray], token_text: Callable[[int], str],
                       decode: Callable[[list[int]], str], num_latents: int,
                       cfg: ExplainConfig) -> pa.Table:
    """Explain every latent from its activations (explain split rows: seq_id, pos, latent, act).

    Latents with fewer than `min_activations` activations get status "dead" and no explanation.
    """
    prompt_sha = hashlib.sha256(TEMPLATE.encode()).hexdigest()[:16]
    order = np.lexsort((-act, latent))
    latent_sorted = latent[order]
    bounds = np.searchsorted(latent_sorted, np.arange(num_latents + 1))
    rows: dict[str, list] = {name: [] for name in EXPLANATION_SCHEMA.names}
    for lat in range(num_latents):
        idx = order[bounds[lat]:bounds[lat + 1]]
        rng = np.random.default_rng([cfg.seed, lat])
        explanation, status, n = None, "dead", 0
        if len(idx) >= cfg.min_activations:
            ex = sample_across_bins(idx, cfg.n_examples, cfg.n_bins, rng)
            targets = [int(tokens[int(seq_id[i])][pos[i]]) for i in ex]
            prevs = [int(tokens[int(seq_id[i])][pos[i] - 1]) for i in ex if pos[i] > 0]
            best = idx[0]
            window = tokens[int(seq_id[best])][max(0, pos[best] - 7):pos[best] + 1]
            explanation = describe_latent(targets, prevs, decode([int(t) for t in window]), token_text, cfg)
            status, n = "explained", len(ex)
        rows["latent"].append(lat)
        rows["status"].append(status)
        rows["explanation"].append(explanation)
        rows["explainer"].append(cfg.method)
        rows["model"].append(None)
        rows["prompt_sha"].append(prompt_sha)
        rows["n_examples"].append(n)
        rows["tokens_in"].append(0)
        rows["tokens_out"].append(0)
    return pa.Table.from_pydict(rows, schema=EXPLANATION_SCHEMA)
