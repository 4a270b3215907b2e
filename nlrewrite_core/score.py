"""Detection scoring: can a judge that reads only the explanation tell firing from non-firing contexts?

Every scorer works on the explain split's scoring half (the sequences the explainer never saw) and
reports balanced accuracy with tp/tn/fp/fn, n_pos and n_neg. Three judges:

- `lexical` (the offline default): a context is called firing when what the explanation names (its
  quoted strings, else its content words) ends at the context's target token. Shares nothing with the
  `embedding` simulator. See lexical_detection_scores.
- `embedding`: the embedding simulator's own similarity of explanation and context, thresholded
  (score_latents): firing (positive) and non-firing (negative) contexts are split in two halves, a
  threshold is fit on one half and the balanced accuracy judged on the other. Since it reuses the
  simulator's similarity, top-by-score selections are partly true by construction with that simulator.
- `detection`: the paper's LLM prompt (llm_detection_scores).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

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


def detection_score(
    pos: np.ndarray, neg: np.ndarray, rng: np.random.Generator
) -> tuple[float, tuple[int, int, int, int]]:
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
NO_FIRING = (np.zeros(0, np.int64), np.zeros(0, np.float32))
"""(rows, activations) of a latent that never fires on the scoring contexts."""


def detection_sample(rows: np.ndarray, acts: np.ndarray, n_contexts: int, cfg, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(positive rows, negative rows) of one latent for the `detection` and `lexical` scorers.

    rows/acts: the context rows (0..n_contexts-1) where the latent fires and its activations there.
    Positives: about `cfg.n_pos`, drawn equally from `cfg.n_bins` activation-rank bins (delphi's
    `split_quantiles` test examples, the paper's setting); negatives: `cfg.n_neg` drawn uniformly from
    the rows where it does not fire.
    """
    from .explain import sample_across_bins

    order = rows[np.argsort(-acts, kind="stable")]
    pos = sample_across_bins(order, cfg.n_pos, cfg.n_bins, rng)[:cfg.n_pos]
    not_firing = np.ones(n_contexts, dtype=bool)
    not_firing[rows] = False
    non = np.flatnonzero(not_firing)
    neg = rng.choice(non, size=min(cfg.n_neg, len(non)), replace=False) if len(non) else np.zeros(0, np.int64)
    return pos, neg


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
    from .llm import prompts as P

    jobs: list[tuple[int, list[tuple[int, int]]]] = []  # (index into latents, [(context row, label)])
    sampled: dict[int, tuple[int, int]] = {}
    for j, lat in enumerate(latents):
        rng = np.random.default_rng([cfg.seed, int(lat)])
        pos, neg = detection_sample(*firing.get(int(lat), NO_FIRING), n_contexts, cfg, rng)
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


# ---- the `lexical` scorer (offline, independent of the simulator) -------------------------------------
# What "detection" means, and where this scorer follows it. The paper's detection scores come from
# delphi's DetectionScorer (EleutherAI/delphi, delphi/scorers/classifier/detection.py): an LLM reads the
# explanation and a shuffled mix of held-out activating examples (`split_quantiles`: the same number from
# each of 10 activation quantiles, never the explainer's examples) and non-activating examples, answers
# 1/0 for each, and the score is the balanced accuracy of those answers (the paper's own copy,
# EleutherAI/sae-auto-interp nl_simulation/nl/classifier.py, has the same structure). We follow it in the sample
# (detection_sample: positives across `n_bins` rank bins of the explain split's scoring half, which the
# explainer never saw; `n_neg` random negatives), in judging every example on its own, and in the score
# (balanced accuracy from tp/tn/fp/fn). We deliberately differ in the judge: a fixed string rule, not an
# LLM. It cannot read meaning (a free-text explanation counts only through its quoted strings or content
# words), so it is a crude but independent offline proxy, not the paper's number. Its point is that it
# shares nothing with the `embedding` simulator (no embedding model, no similarity, no weights), so "top
# by detection score" and the score relation of Figure 4 are not true by construction. Second difference:
# delphi's examples are fixed windows that are positive when the latent fires anywhere in them (and
# negative when it fires nowhere); ours are the simulator's contexts, a window ending at a target token
# that is positive when the latent fires at the target. The rule therefore asks whether what the
# explanation names ends at the target, not whether it occurs anywhere in the window: a frequent named
# token ("the") occurs somewhere in most 32-token windows, so containment would call nearly every
# negative firing.

_QUOTED = re.compile(r"\u201c([^\u201d]*)\u201d|\u2018([^\u2019]*)\u2019|\"([^\"]*)\"|(?<!\w)'([^']+)'(?!\w)|`([^`]+)`")
"""Quoted strings: “curly”, ‘curly single’, "straight", 'straight single' (not an apostrophe), `code`."""
_CONTEXT_CUE = re.compile(r"\b(after|following|preceded by|before|followed by)\b", re.IGNORECASE)
"""A quoted string in the same sentence after one of these words names a neighbour, not the firing text."""
_SENTENCE_END = re.compile(r"[.!?;]\s")
_WHITESPACE_NAMES = {"a space": " ", "a newline": "\n"}
"""How the `ngram` explainer names whitespace-only tokens (explain.show_token)."""
_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")
STOPWORDS = frozenset("""
a an and any are as at be been but by can do does for from has have in is it its of on or that the their
them then there these this those to was were which while with within without into onto than when where who
not no also often usually mostly mainly typically sometimes always some such other very more most
token tokens word words text texts phrase phrases fires fire firing activates activate activation activations
latent latents feature features neuron context contexts example examples mention mentions mentioned
related relating refers refer references reference like including include includes specific specifically
particular particularly various certain following preceding appears appear occurs occur occurrence
""".split())
"""Words that name no text of their own (function words and explanation boilerplate): never content words."""


def _norm(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Names:
    """What an explanation names, as the lexical scorer matches it."""

    exact: frozenset[str]
    """Quoted strings (whitespace-normalised), matched case-sensitively: a quote is a literal."""
    folded: frozenset[str]
    """Content words (casefolded), matched case-insensitively: used only when nothing is quoted."""
    whitespace: frozenset[str]
    """Whitespace-only names: " " (a space, tab...) and/or "\\n" (a newline)."""

    @property
    def max_chars(self) -> int:
        return max((len(n) for n in self.exact | self.folded), default=0)


def explanation_names(explanation: str) -> Names:
    """The strings an explanation names.

    1. Quoted strings (see _QUOTED), except those that a context cue ("after", "following", "preceded
       by", "before", "followed by") introduces earlier in the same sentence: those name a neighbour of
       the firing text (the `ngram` explainer's "usually after “of”"), not the firing text.
       The `ngram` explainer's “a space” / “a newline” stand for whitespace-only tokens; a quoted string
       that is only whitespace names such a token too.
    2. No quoted string at all (free text): its content words, i.e. words that are not in STOPWORDS.
    """
    exact: set[str] = set()
    whitespace: set[str] = set()
    quoted = False
    in_context, last = False, 0
    for m in _QUOTED.finditer(explanation):
        quoted = True
        clauses = _SENTENCE_END.split(explanation[last:m.start()])  # the text since the previous quote
        last = m.end()
        if len(clauses) > 1:  # a new sentence: its quotes name firing text again
            in_context = False
        if _CONTEXT_CUE.search(clauses[-1]):
            in_context = True
        if in_context:
            continue
        raw = next(g for g in m.groups() if g is not None)
        if raw in _WHITESPACE_NAMES:
            whitespace.add(_WHITESPACE_NAMES[raw])
        elif raw and not raw.strip():
            whitespace.add("\n" if "\n" in raw else " ")
        elif _norm(raw):
            exact.add(_norm(raw))
    folded: set[str] = set()
    if not quoted:
        folded = {w.casefold() for w in _WORD.findall(explanation) if w.casefold() not in STOPWORDS}
    return Names(frozenset(exact), frozenset(folded), frozenset(whitespace))


class WindowSuffixes:
    """The decoded text ending at each context's target token, one token boundary at a time.

    suffixes(row)[m - 1] is the whitespace-normalised text of the last m tokens of the row's window
    (`window` tokens ending at the target, fewer at a sequence start), built lazily and cached up to
    the longest name asked for. Rows are context rows of `tokens` [n_seq, seq_len]: row = s * seq_len + p.
    Texts are joined from each token's decoded text; when a joined piece holds a replacement character (a
    multi-byte character split across tokens) the tokens are decoded together instead.
    """

    def __init__(self, tokens: np.ndarray, decode: Callable[[list[int]], str], window: int):
        self.tokens, self.decode, self.window = tokens, decode, window
        self.seq_len = tokens.shape[1]
        self._token_text: dict[int, str] = {}
        self._cache: dict[int, tuple[list[str], str]] = {}

    def token_text(self, t: int) -> str:
        if t not in self._token_text:
            self._token_text[t] = self.decode([t])
        return self._token_text[t]

    def target_text(self, row: int) -> str:
        s, p = divmod(int(row), self.seq_len)
        return self.token_text(int(self.tokens[s, p]))

    def suffixes(self, row: int, max_chars: int) -> list[str]:
        """Normalised suffix texts for m = 1, 2, ... tokens, until one is longer than max_chars."""
        s, p = divmod(int(row), self.seq_len)
        out, raw = self._cache.get(row, ([], ""))
        first = max(0, p - self.window + 1)
        while (not out or len(out[-1]) <= max_chars) and p - len(out) >= first:
            q = p - len(out)
            raw = self.token_text(int(self.tokens[s, q])) + raw
            text = raw if "\ufffd" not in raw else self.decode([int(t) for t in self.tokens[s, q:p + 1]])
            out.append(_norm(text))
        self._cache[row] = (out, raw)
        return out


def lexical_match(names: Names, suffixes: WindowSuffixes, row: int) -> bool:
    """Whether the lexical scorer calls a context firing: what the explanation names ends at its target.

    True when the text of the window's last m tokens (m = 1 .. score.window, starting at a token
    boundary, whitespace-normalised) equals a quoted name exactly, or a content word case-insensitively.
    A target token that is whitespace only matches only a whitespace name: "a space" (no newline in
    it) or "a newline".
    A name that matches only in the middle of a token ("at" in " cat") does not count.
    """
    target = suffixes.target_text(row)
    if target and not target.strip():  # a whitespace-only target: only a whitespace name matches it
        return ("\n" if "\n" in target else " ") in names.whitespace
    if not names.exact and not names.folded:
        return False
    for text in suffixes.suffixes(row, names.max_chars):
        if text in names.exact or (names.folded and text.casefold() in names.folded):
            return True
    return False


def lexical_detection_scores(latents: np.ndarray, explanations: list[str],
                             firing: dict[int, tuple[np.ndarray, np.ndarray]], tokens: np.ndarray,
                             decode: Callable[[list[int]], str], cfg) -> pa.Table:
    """Detection scores of the `lexical` scorer (see the comment above and lexical_match).

    tokens: [n_seq, seq_len] tokens of the scoring contexts' sequences; context row r is (r // seq_len,
    r % seq_len). firing[latent] = (rows where it fires, activations there). Per latent, detection_sample
    draws the positives and negatives (seeded by (cfg.seed, latent)); each is called firing or not by
    lexical_match; the score is the balanced accuracy, null when there is no positive or no negative.
    """
    suffixes = WindowSuffixes(tokens, decode, cfg.window)
    n_contexts = tokens.shape[0] * tokens.shape[1]
    rows: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}
    for lat, text in zip(latents, explanations):
        rng = np.random.default_rng([cfg.seed, int(lat)])
        pos, neg = detection_sample(*firing.get(int(lat), NO_FIRING), n_contexts, cfg, rng)
        names = explanation_names(text)
        tp = sum(lexical_match(names, suffixes, r) for r in pos)
        fp = sum(lexical_match(names, suffixes, r) for r in neg)
        counts = (tp, len(neg) - fp, fp, len(pos) - tp)
        rows["latent"].append(int(lat))
        rows["scorer"].append("lexical-detection")
        rows["score"].append(balanced_accuracy(*counts) if len(pos) and len(neg) else None)
        rows["n_pos"].append(len(pos))
        rows["n_neg"].append(len(neg))
        for name, c in zip(("tp", "tn", "fp", "fn"), counts):
            rows[name].append(int(c))
    return pa.Table.from_pydict(rows, schema=SCORE_SCHEMA)
