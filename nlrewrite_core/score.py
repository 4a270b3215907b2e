"""Detection scoring: can a similarity score tell firing from non-firing contexts?

For each explained latent, firing (positive) and non-firing (negative) contexts are split in two
halves: a threshold on the explanation-context similarity is fit on one half and the balanced
accuracy is judged on the other, so the score is never measured on the data its threshold saw.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCORE_SCHEMA = pa.schema([
    ("latent", pa.int32()), ("scorer", pa.string()), ("score", pa.float64()),
    ("n_pos", pa.int32()), ("n_neg", pa.int32()),
    ("tp", pa.int32()), ("tn", pa.int32()), ("fp", pa.int32()), ("fn", pa.int32()),
])


def balanced_accuracy(tp: int, tn: int, fp: int, fn: int) -> float:
    """Mean of sensitivity and specificity."""
    sens = tp / (tp + fn) if tp + fn else 0.0
    spec = tn / (tn + fp) if tn + fp else 0.0
    return 0.5 * (sens + spec)


def confusion(pos: np.ndarray, neg: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(tp, tn, fp, fn) when a context is called firing iff its similarity > threshold."""
    tp = int((pos > threshold).sum())
    fp = int((neg > threshold).sum())
    return tp, len(neg) - fp, fp, len(pos) - tp


def fit_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The threshold that maximises balanced accuracy on (pos, neg): a midpoint between values."""
    values = np.unique(np.concatenate([pos, neg]))
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    best = max(candidates, key=lambda t: balanced_accuracy(*confusion(pos, neg, float(t))))
    return float(best)


def detection_score(pos: np.ndarray, neg: np.ndarray, rng: np.random.Generator) -> tuple[float, tuple[int, int, int, int]]:
    """Balanced accuracy on held-out halves, with the threshold fit on the other halves."""
    pos, neg = rng.permutation(pos), rng.permutation(neg)
    hp, hn = len(pos) // 2, len(neg) // 2
    threshold = fit_threshold(pos[:hp], neg[:hn])
    counts = confusion(pos[hp:], neg[hn:], threshold)
    return balanced_accuracy(*counts), counts


def score_latents(sim: np.ndarray, firing: np.ndarray, latents: np.ndarray, n_pos: int, n_neg: int,
                  seed: int, scorer: str) -> pa.Table:
    """Detection scores for `latents`.

    sim: [n_contexts, len(latents)] similarity of each latent's explanation to each context;
    firing: boolean [n_contexts, len(latents)], whether the latent is active there.
    A latent with fewer than 2 firing contexts gets a null score (counts still recorded).
    """
    rows: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}
    for j, lat in enumerate(latents):
        rng = np.random.default_rng([seed, int(lat)])
        pos_idx = np.flatnonzero(firing[:, j])
        neg_idx = np.flatnonzero(~firing[:, j])
        pos_idx = rng.choice(pos_idx, size=min(n_pos, len(pos_idx)), replace=False)
        neg_idx = rng.choice(neg_idx, size=min(n_neg, len(neg_idx)), replace=False)
        score, counts = None, (0, 0, 0, 0)
        if len(pos_idx) >= 2 and len(neg_idx) >= 2:
            score, counts = detection_score(sim[pos_idx, j], sim[neg_idx, j], rng)
        rows["latent"].append(int(lat))
        rows["scorer"].append(scorer)
        rows["score"].append(score)
        rows["n_pos"].append(len(pos_idx))
        rows["n_neg"].append(len(neg_idx))
        for name, c in zip(("tp", "tn", "fp", "fn"), counts):
            rows[name].append(c)
    return pa.Table.from_pydict(rows, schema=SCORE_SCHEMA)


# ---- the `detection` scorer (an LLM, the paper's prompt) ----------------------------------------------
LLM_SCORE_SCHEMA = SCORE_SCHEMA.append(pa.field("n_malformed", pa.int32()))


def llm_detection_scores(latents: np.ndarray, explanations: list[str], firing: dict[int, tuple[np.ndarray, np.ndarray]],
                         n_contexts: int, window_text, cfg, llm) -> tuple[pa.Table, dict[str, int]]:
    """Detection scores from an LLM.

    firing[latent] = (context rows where it fires, their activations); contexts are rows
    0..n_contexts-1 and window_text(row) is the text shown for one. Per latent: `n_pos` positives
    drawn equally from `n_bins` activation-rank bins and `n_neg` negatives from contexts where it
    does not fire, shuffled and shown `examples_per_prompt` to a prompt; the LLM answers one 0/1 per
    example. Examples of a prompt whose answer does not parse are counted in n_malformed and left
    out of tp/tn/fp/fn; the score (balanced accuracy) is null when no positive or no negative was judged.
    Returns the table and totals {n_prompts, n_malformed_prompts, n_malformed_examples}.
    """
    from .explain import sample_across_bins
    from .llm import prompts as P

    jobs: list[tuple[int, list[tuple[int, int]]]] = []  # (index into latents, [(context row, label)])
    sampled: dict[int, tuple[int, int]] = {}
    for j, lat in enumerate(latents):
        rng = np.random.default_rng([cfg.seed, int(lat)])
        rows, acts = firing.get(int(lat), (np.zeros(0, np.int64), np.zeros(0, np.float32)))
        order = rows[np.argsort(-acts, kind="stable")]
        pos = sample_across_bins(order, cfg.n_pos, cfg.n_bins, rng)
        pos = pos[:cfg.n_pos]
        non = np.setdiff1d(np.arange(n_contexts), rows)
        neg = rng.choice(non, size=min(cfg.n_neg, len(non)), replace=False) if len(non) else np.zeros(0, np.int64)
        sampled[j] = (len(pos), len(neg))
        ex = [(int(r), 1) for r in pos] + [(int(r), 0) for r in neg]
        ex = [ex[i] for i in rng.permutation(len(ex))]
        for a in range(0, len(ex), cfg.examples_per_prompt):
            jobs.append((j, ex[a:a + cfg.examples_per_prompt]))
    prompts = [P.detection_prompt(explanations[j], [window_text(r) for r, _ in chunk]) for j, chunk in jobs]
    max_new = min(llm.cfg.max_new_tokens, 4 * cfg.examples_per_prompt + 16)
    answers = llm.generate(prompts, max_new_tokens=max_new) if prompts else []
    counts = np.zeros((len(latents), 5), dtype=np.int64)  # tp, tn, fp, fn, malformed
    bad_prompts = 0
    for (j, chunk), ans in zip(jobs, answers):
        vals, _reason = P.parse_detection(ans, len(chunk))
        if vals is None:
            counts[j, 4] += len(chunk)
            bad_prompts += 1
            continue
        for (_, label), v in zip(chunk, vals):
            counts[j, {(1, 1): 0, (0, 0): 1, (0, 1): 2, (1, 0): 3}[(label, v)]] += 1
    rows: dict[str, list] = {name: [] for name in LLM_SCORE_SCHEMA.names}
    for j, lat in enumerate(latents):
        tp, tn, fp, fn, bad = (int(x) for x in counts[j])
        rows["latent"].append(int(lat))
        rows["scorer"].append(f"llm-detection:{llm.name}")
        rows["score"].append(balanced_accuracy(tp, tn, fp, fn) if tp + fn and tn + fp else None)
        rows["n_pos"].append(sampled[j][0])
        rows["n_neg"].append(sampled[j][1])
        for name, c in zip(("tp", "tn", "fp", "fn", "n_malformed"), (tp, tn, fp, fn, bad)):
            rows[name].append(c)
    totals = {"n_prompts": len(jobs), "n_malformed_prompts": bad_prompts,
              "n_malformed_examples": int(counts[:, 4].sum())}
    return pa.Table.from_pydict(rows, schema=LLM_SCORE_SCHEMA), totals
