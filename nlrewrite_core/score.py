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
