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


# ---- the `llm` explainer (the paper's prompt) --------------------------------------------------------
LLM_EXPLANATION_SCHEMA = EXPLANATION_SCHEMA.append(pa.field("reason", pa.string()))


def example_window(seq_len: int, pos: int, window: int) -> tuple[int, int]:
    """[start, end) of a `window`-token window holding `pos` about three quarters of the way in."""
    start = max(0, min(pos - (3 * window) // 4, seq_len - window))
    return start, min(seq_len, start + window)


def highlighted_example(toks: np.ndarray, acts_at: dict[int, float], start: int, end: int, max_act: float,
                        decode: Callable[[list[int]], str], token_text: Callable[[int], str]
                        ) -> tuple[list[tuple[str, bool]], list[tuple[str, int]]]:
    """The window's text as runs (text, active) and its active tokens with activations scaled 0-10."""
    pieces: list[tuple[str, bool]] = []
    listed: list[tuple[str, int]] = []
    run: list[int] = []
    run_on = False
    for q in range(start, end):
        on = acts_at.get(q, 0.0) > 0
        if on != run_on and run:
            pieces.append((decode(run), run_on))
            run = []
        run_on = on
        run.append(int(toks[q]))
        if on:
            scaled = int(round(10 * acts_at[q] / max_act)) if max_act > 0 else 0
            listed.append((token_text(int(toks[q])), min(max(scaled, 0), 10)))
    if run:
        pieces.append((decode(run), run_on))
    return pieces, listed


def llm_explanations(seq_id: np.ndarray, pos: np.ndarray, latent: np.ndarray, act: np.ndarray,
                     tokens: dict[int, np.ndarray], token_text: Callable[[int], str],
                     decode: Callable[[list[int]], str], num_latents: int, cfg: ExplainConfig, llm,
                     neighbors: dict[int, list[int]] | None = None) -> pa.Table:
    """Explain every latent with an LLM and the paper's prompt.

    Examples are sampled across `n_bins` activation-rank bins (`n_examples` in all: the paper's
    10 x 4), each a `window`-token window with every token the latent fires on marked <<tok>> and
    listed with its activation scaled 0-10 against the latent's maximum. The answer is read after
    `[EXPLANATION]:`; a latent whose answers do not parse after `max_retries` new attempts (sampled at
    temperature 0.7) is recorded as `unexplained` with the reason, never with a made-up text.
    neighbors (the `contrastive` explainer): latent -> its nearest latents; up to `n_contrast`
    contexts where they fire most and the latent does not are added as counter-examples.
    """
    from .llm import prompts as P

    prompt_sha = hashlib.sha256((P.EXPLAINER_SYSTEM + P.EXPLAINER_TAIL).encode()).hexdigest()[:16]
    order = np.lexsort((-act, latent))
    latent_sorted = latent[order]
    bounds = np.searchsorted(latent_sorted, np.arange(num_latents + 1))
    prompts: dict[int, object] = {}
    n_shown: dict[int, int] = {}
    for lat in range(num_latents):
        idx = order[bounds[lat]:bounds[lat + 1]]
        if len(idx) < cfg.min_activations:
            continue
        rng = np.random.default_rng([cfg.seed, lat])
        ex = sample_across_bins(idx, cfg.n_examples, cfg.n_bins, rng)
        by_seq: dict[int, dict[int, float]] = {}
        for i in idx:
            by_seq.setdefault(int(seq_id[i]), {})[int(pos[i])] = float(act[i])
        max_act = float(act[idx[0]])
        examples = []
        for i in ex:
            s, p = int(seq_id[i]), int(pos[i])
            toks = tokens[s]
            a, b = example_window(len(toks), p, cfg.window)
            examples.append(highlighted_example(toks, by_seq[s], a, b, max_act, decode, token_text))
        counter = []
        if neighbors:
            cand = [(float(act[i]), int(seq_id[i]), int(pos[i]))
                    for nb in neighbors.get(lat, []) for i in order[bounds[nb]:bounds[nb + 1]]
                    if int(pos[i]) not in by_seq.get(int(seq_id[i]), {})]
            seen: set[tuple[int, int]] = set()
            for _, s, p in sorted(cand, reverse=True):
                if (s, p) in seen:
                    continue
                seen.add((s, p))
                a, b = example_window(len(tokens[s]), p, cfg.window)
                pieces, _ = highlighted_example(tokens[s], {p: 1.0}, a, b, 1.0, decode, token_text)
                counter.append(pieces)
                if len(counter) >= cfg.n_contrast:
                    break
        prompts[lat] = P.explainer_prompt(examples, counter)
        n_shown[lat] = len(ex)
    todo = list(prompts)
    answers: dict[int, tuple[str | None, str | None]] = {}
    used: dict[int, list[int]] = {lat: [0, 0] for lat in todo}
    for attempt in range(cfg.max_retries + 1):
        if not todo:
            break
        temperature = None if attempt == 0 else max(0.7, llm.cfg.temperature)
        outs = llm.generate([prompts[lat] for lat in todo], temperature=temperature, seed=cfg.seed + attempt)
        spent = llm.last_tokens if len(llm.last_tokens) == len(todo) else [(0, 0)] * len(todo)
        retry = []
        for lat, out, (ti, to) in zip(todo, outs, spent):
            used[lat][0] += ti
            used[lat][1] += to
            text, reason = P.parse_explanation(out)
            answers[lat] = (text, reason if text is None else None)
            if text is None:
                retry.append(lat)
        todo = retry
    rows: dict[str, list] = {name: [] for name in LLM_EXPLANATION_SCHEMA.names}
    for lat in range(num_latents):
        text, reason = answers.get(lat, (None, None))
        if lat not in prompts:
            status, reason = "dead", None
        elif text is None:
            status, reason = "unexplained", f"{reason} (after {cfg.max_retries + 1} attempts)"
        else:
            status = "explained"
        rows["latent"].append(lat)
        rows["status"].append(status)
        rows["explanation"].append(text)
        rows["explainer"].append(cfg.method)
        rows["model"].append(llm.name)
        rows["prompt_sha"].append(prompt_sha)
        rows["n_examples"].append(n_shown.get(lat, 0))
        rows["tokens_in"].append(used.get(lat, [0, 0])[0])
        rows["tokens_out"].append(used.get(lat, [0, 0])[1])
        rows["reason"].append(reason)
    return pa.Table.from_pydict(rows, schema=LLM_EXPLANATION_SCHEMA)


def decoder_neighbors(w_dec: np.ndarray, n: int, block: int = 1024) -> dict[int, list[int]]:
    """Each latent's n nearest latents by cosine of decoder directions (rows of w_dec), itself excluded."""
    w = w_dec / np.maximum(np.linalg.norm(w_dec, axis=1, keepdims=True), 1e-12)
    n = min(n, len(w) - 1)
    out: dict[int, list[int]] = {}
    for a in range(0, len(w), block):
        sim = w[a:a + block] @ w.T
        sim[np.arange(len(sim)), np.arange(a, a + len(sim))] = -np.inf
        top = np.argsort(-sim, axis=1, kind="stable")[:, :n]
        out.update({a + r: [int(x) for x in row] for r, row in enumerate(top)})
    return out
