"""The paper's prompts (explainer, detection scorer, simulator) and the parsers of their answers.

Every parser takes any string (empty, truncated, adversarial) and returns a value or a reason;
none raises. Context text is shown with `<<` and `>>` neutralised, so a context cannot fake the
highlighting delimiters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Literal

from . import Prompt, SlotPrompt


# ---- shared ---------------------------------------------------------------------------------------
def clean(text: str) -> str:
    """Context text as shown in a prompt: the highlight delimiters cannot occur inside it."""
    return text.replace("<<", "\u2039\u2039").replace(">>", "\u203a\u203a")


def highlight(pieces: Sequence[tuple[str, bool]]) -> str:
    """Join (text, active) runs, wrapping each active run in << >>."""
    return "".join(f"<<{clean(t)}>>" if on else clean(t) for t, on in pieces)


# ---- explainer (the paper's format: delphi / sae-auto-interp default explainer) ---------------------
EXPLAINER_SYSTEM = """You are a meticulous AI researcher conducting an important investigation into patterns found in language. Your task is to analyze text and provide an explanation that thoroughly encapsulates possible patterns found in it.
Guidelines:

You will be given a list of text examples on which special words are selected and between delimiters like <<this>>. If a sequence of consecutive tokens all are important, the entire sequence of tokens will be contained between delimiters <<just like this>>. How important each token is for the behavior is listed after each example in parentheses, on a scale from 0 to 10.

- Try to produce a concise final description. Simply describe the text latents that are common in the examples, and what patterns you found.
- If the examples are uninformative, you don't need to mention them. Don't focus on giving examples of important tokens, but try to summarize the patterns found in the examples.
- Do not mention the marker tokens (<< >>) in your explanation.
- Do not make lists of possible explanations. Keep your explanations short and concise.
- The last line of your response must be the formatted explanation, using [EXPLANATION]:

"""
EXPLAINER_TAIL = "\nGive your explanation now. The last line of your response must start with [EXPLANATION]:\n"
MAX_EXPLANATION_CHARS = 600


CONTRAST_HEAD = ("\nCounter-examples: in these texts, latents similar to this one activate (on the tokens "
                 "marked <<like this>>) but this latent does NOT. Your explanation should say what distinguishes "
                 "the examples above from these.\n\n")


def explainer_prompt(examples: Sequence[tuple[Sequence[tuple[str, bool]], Sequence[tuple[str, int]]]],
                     counter: Sequence[Sequence[tuple[str, bool]]] = ()) -> Prompt:
    """examples: (highlighted runs, [(token text, activation 0-10)]) per example; counter: runs of
    the contrastive counter-examples (their marked tokens are where a neighbouring latent fires)."""
    lines = []
    for n, (pieces, acts) in enumerate(examples, 1):
        listed = ", ".join(f'("{clean(t)}", {a})' for t, a in acts)
        lines.append(f"Example {n}: {highlight(pieces)}\nActivations: {listed}\n")
    body = "\n".join(lines)
    if counter:
        body += CONTRAST_HEAD + "".join(f"Counter-example {n}: {highlight(c)}\n" for n, c in enumerate(counter, 1))
    return Prompt(EXPLAINER_SYSTEM, body + EXPLAINER_TAIL)


def parse_explanation(answer: str | None) -> tuple[str | None, str | None]:
    """(explanation, None) from the text after the last `[EXPLANATION]:`, or (None, reason)."""
    if not answer or not answer.strip():
        return None, "empty answer"
    idx = answer.rfind("[EXPLANATION]:")
    if idx < 0:
        return None, "no [EXPLANATION]: in the answer"
    rest = answer[idx + len("[EXPLANATION]:"):].strip()
    line = next((ln.strip() for ln in rest.splitlines() if ln.strip()), "")
    line = line.strip().strip('"').strip()
    if not line:
        return None, "empty text after [EXPLANATION]:"
    if not any(ch.isalpha() for ch in line):
        return None, "explanation has no words"
    return line[:MAX_EXPLANATION_CHARS], None


# ---- detection scorer -------------------------------------------------------------------------------
DETECTION_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given a certain latent of text, such as "male pronouns" or "text with negative sentiment".

You will then be given several text examples. Your task is to determine which examples possess the latent.

For each example in turn, return 1 if the sentence is correctly labeled or 0 if the tokens are mislabeled. You must return your response in a valid Python list. Do not return anything else besides a Python list.

"""


def detection_prefix(explanation: str) -> str:
    return DETECTION_SYSTEM + f"Latent explanation: {clean(explanation)}\n\nText examples:\n\n"


def detection_prompt(explanation: str, texts: Sequence[str]) -> Prompt:
    body = "".join(f"Example {i}: {clean(t)}\n" for i, t in enumerate(texts))
    return Prompt(detection_prefix(explanation), body + f"\nAnswer with a Python list of {len(texts)} values (1 or 0):\n")


_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_detection(answer: str | None, n: int) -> tuple[list[int] | None, str | None]:
    """The first Python-style list of exactly n values in {0, 1} (also yes/no, true/false), or
    (None, reason)."""
    if not answer or not answer.strip():
        return None, "empty answer"
    m = _LIST.search(answer)
    if not m:
        return None, "no list in the answer"
    words = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0}
    items = [x.strip().strip("'\"").lower() for x in m.group(1).split(",")]
    if items == [""]:
        items = []
    if len(items) != n:
        return None, f"list of {len(items)} values, expected {n}"
    if any(x not in words for x in items):
        return None, "a value that is not 0/1"
    return [words[x] for x in items], None


# ---- simulator ----------------------------------------------------------------------------------------
SIMULATOR_SYSTEM = """We're studying latents in a neural network. Each latent looks for some particular thing in a short document. Look at the explanation of what the latent does, and predict how strongly it activates on the last token of a text, marked <<like this>>.

Answer with a single digit from 0 to 9: 0 means the latent does not activate at all, 9 means it activates as strongly as it ever does. Most tokens get 0.

"""


SIMULATOR_QUESTION = "Activation of the last token (0-9):"
PromptOrder = Literal["explanation_first", "context_first"]
"""Order of the simulator prompt's two parts. `explanation_first` (the paper's): the prefix is the
instructions and the explanation, shared by all of a latent's contexts; the suffix is the context
and the question. `context_first`: the prefix is the instructions and the context, shared by all
the latents simulated on it; the question is asked in the prefix, before the explanation, and the
suffix is the explanation and a short answer cue (`CONTEXT_FIRST_CUE`): the fewest tokens per prompt."""
CONTEXT_FIRST_QUESTION = ("How strongly does the latent explained below activate on the marked last token? "
                          "Answer after 'Activation:' with a digit from 0 to 9.\n\nExplanation of the latent:")
CONTEXT_FIRST_CUE = "\nActivation:"


def simulator_explanation(explanation: str) -> str:
    """The explanation part of a simulator prompt."""
    return f"Explanation of the latent: {clean(explanation)}\n\n"


def simulator_context(before: str, last: str) -> str:
    """The context part of a simulator prompt: the window with its last token marked."""
    return f"Text: {clean(before)}<<{clean(last)}>>\n\n"


def simulator_prompt(explanation: str, context: str, order: PromptOrder = "explanation_first") -> Prompt:
    """The simulator prompt of an explanation and a context part (`simulator_context`): the
    instructions, the two parts in `order` (the first one ends the shared prefix), the question
    (see PromptOrder for where context_first asks it)."""
    if order == "explanation_first":
        return Prompt(SIMULATOR_SYSTEM + simulator_explanation(explanation), context + SIMULATOR_QUESTION)
    if order == "context_first":
        return Prompt(SIMULATOR_SYSTEM + context + CONTEXT_FIRST_QUESTION, f" {clean(explanation)}{CONTEXT_FIRST_CUE}")
    raise ValueError(f"unknown simulator prompt order {order!r}")


def expected_digit(top: dict[str, float] | None, renormalize: bool = True) -> float | None:
    """E = sum_d d * p(d) over the digit tokens among the top logprobs (token text stripped of
    whitespace is one of 0-9). renormalize: divide by the digits' total probability (ours); else
    the paper's unrenormalized sum. None when no digit is among them (a failed prediction)."""
    if not top:
        return None
    p = [0.0] * 10
    for tok, lp in top.items():
        t = tok.strip() if isinstance(tok, str) else ""
        if len(t) == 1 and t in "0123456789" and isinstance(lp, (int, float)) and math.isfinite(lp):
            p[int(t)] += math.exp(min(lp, 0.0))
    total = sum(p)
    if total <= 0:
        return None
    e = sum(d * pd for d, pd in enumerate(p))
    e = e / total if renormalize else e
    return min(max(e, 0.0), 9.0)


def digit_to_activation(e: float, max_act: float) -> float:
    """E in [0, 9] mapped linearly onto [0, max_act]: 0 -> 0 and 9 -> max_act exactly."""
    return float(min(max(e, 0.0), 9.0) / 9.0 * max_act)


# ---- the all-at-once simulator ---------------------------------------------------------------------------
# OpenAI's "all at once" simulator (Bills et al. 2023), as delphi runs it (delphi/scorers/simulator/
# oai_autointerp/explanations/simulator.py, ExplanationNeuronSimulator): the sentence is written one token
# per line as `token<tab>unknown`, and one forward pass gives, at each line's activation slot (the token
# after the tab), the model's distribution over the activation digits; the expected value is the prediction.
# We follow that layout (tab separator, "unknown" written in every slot, prompt log-probabilities, no
# generation) and differ where their code is fragile or does not match our method:
# - activations are 0-9 (one digit token in every tokenizer: our `llm` simulator's scale), not 0-10;
# - one short worked example in the instructions instead of delphi's few-shot neuron records, and the
#   explanation written as in our `llm` prompt (no "the main thing this neuron does is find" prefix);
# - slots are placed by construction (each line tokenized on its own, or found by character offset),
#   not by searching the tokenized prompt for tab tokens: a subject token that contains a tab or a
#   newline is shown escaped (\t, \n), and cannot shift the slots (delphi's own TODO: "\t\t" merges);
# - a slot with no digit among its top logprobs is a failed prediction, counted, not a 0 (delphi pads
#   or truncates its expected values with zeros when the counts disagree).
ALL_AT_ONCE_SYSTEM = """We're studying latents in a neural network. Each latent looks for some particular thing in a short document. Look at the explanation of what the latent does, and predict how strongly it activates on each token of a text.

The text is written one token per line: the token, a tab, then the latent's activation on that token, a digit from 0 to 9. 0 means the latent does not activate at all, 9 means it activates as strongly as it ever does. Most activations are 0. "unknown" stands for an activation you have to predict.

For example, for a latent explained as "the word cat":
The\t0
 cat\t9
 sat\t0
 on\t0
 the\t0
 mat\t0

"""
SLOT_FILLER = "unknown"
"""What the prompt holds in every activation slot (the distribution there is read, never sampled)."""


def token_line(text: str) -> str:
    """A subject token as shown on its line: tabs, newlines and carriage returns escaped, so that a token
    can neither end its line early nor look like the activation separator."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def all_at_once_prefix(explanation: str) -> str:
    """The shared part of a latent's all-at-once prompts: the instructions and the explanation."""
    return ALL_AT_ONCE_SYSTEM + simulator_explanation(explanation) + "Text:\n"


def all_at_once_prompt(explanation: str, tokens: Sequence[str], read: Iterable[int] | None = None) -> SlotPrompt:
    """The all-at-once prompt of an explanation and a sentence (`tokens`: each token's text): line i is
    `token_line(tokens[i])`, a tab, and the slot read for token i; earlier slots hold `SLOT_FILLER`.
    `read`: the token positions whose slots are returned (sorted; default every token); the prompt
    ends at the last one read."""
    read = tuple(range(len(tokens))) if read is None else tuple(int(i) for i in read)
    if not read or list(read) != sorted(set(read)) or read[0] < 0 or read[-1] >= len(tokens):
        raise ValueError(f"read positions must be distinct, sorted and within the {len(tokens)} tokens: {read}")
    pieces = [("" if i == 0 else SLOT_FILLER + "\n") + token_line(t) + "\t" for i, t in enumerate(tokens[:read[-1] + 1])]
    return SlotPrompt(all_at_once_prefix(explanation), tuple(pieces), read)
