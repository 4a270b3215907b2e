"""What several stages read: the shared artifact readers, public, in one place.

Each function reads one kind of artifact of a run (by its stage keys) and returns arrays or tables:
the corpus' tokens and tokenizer, the subject and the transcoder, the cached activations (dense or
sparse), the context embeddings, the explanations' embeddings, the simulator's predictions, the
true sample of quantile normalisation. The contexts helpers say which (sequence, position) contexts a
split simulates and how their ids map to rows. A reader used by one stage alone stays in that
stage's module (nlrewrite_core/stages/).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from . import (
    calibrate_stream as stream_lib,
    embedding as emb_lib,
    evaluate as eval_lib,
    quantile as quantile_lib,
    transcoder as tc_lib,
)
from .config import RewriteConfig
from .storage import Store
from .subject import to_device

if TYPE_CHECKING:
    from sparsify import SparseCoder
    from transformers import PreTrainedModel


# ---- devices and tables ------------------------------------------------------------------------
def device(cfg: RewriteConfig) -> str:
    dev = cfg.execution.device
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


def read_table(store: Store, stage: str, key: str, name: str, **kw: Any) -> pa.Table:
    return store.read_parquet(f"{store.artifact_dir(stage, key)}/{name}.parquet", **kw)


def num_latents(store: Store, keys: dict[str, str]) -> int:
    return int(store.read_manifest("activations", keys["activations"])["metrics"]["num_latents"])


def max_act(store: Store, keys: dict[str, str], num_latents: int) -> np.ndarray:
    """Per-latent maximum activation on the explain split (the scale the simulator maps onto)."""
    s = read_table(store, "activations", keys["activations"], "latent_stats", filters=pc.field("split") == "explain")
    out = np.zeros(num_latents, dtype=np.float32)
    out[s.column("latent").to_numpy()] = s.column("max_act").to_numpy()
    return out


def calib_latent_means(store: Store, keys: dict[str, str], num_latents: int) -> np.ndarray:
    """Each latent's mean activation over all calib tokens (zeros included), from latent_stats."""
    s = read_table(store, "activations", keys["activations"], "latent_stats", filters=pc.field("split") == "calib")
    n_tokens = store.read_manifest("activations", keys["activations"])["metrics"]["n_tokens"]["calib"]
    out = np.zeros(num_latents, dtype=np.float64)
    lat = s.column("latent").to_numpy()
    out[lat] = s.column("n_active").to_numpy() * s.column("mean_act").to_numpy().astype(np.float64) / max(n_tokens, 1)
    return out.astype(np.float32)


# ---- corpus, subject, transcoder ---------------------------------------------------------------
def load_tokens(store: Store, keys: dict[str, str], splits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(seq_ids, tokens [n, seq_len]) of the given splits, ordered by seq_id."""
    t = read_table(store, "corpus", keys["corpus"], "tokens", filters=pc.field("split").isin(list(splits)))
    t = t.sort_by("seq_id")
    seq_ids = t.column("seq_id").to_numpy()
    if not len(t):
        return seq_ids, np.zeros((0, 0), np.int64)
    flat = t.column("tokens").combine_chunks().flatten().to_numpy()  # no Python lists: 8 bytes per token
    return seq_ids, flat.astype(np.int64).reshape(len(t), -1)


def load_tokenizer(store: Store, keys: dict[str, str]):
    from tokenizers import Tokenizer

    path = f"{store.artifact_dir('corpus', keys['corpus'])}/tokenizer.json"
    return Tokenizer.from_str(store.read_bytes(path).decode())


def load_subject(store: Store, keys: dict[str, str], device: str = "cpu") -> PreTrainedModel:
    from transformers import GPTNeoXForCausalLM

    path = store.local_dir(store.artifact_dir("subject", keys["subject"], "model"))
    return to_device(GPTNeoXForCausalLM.from_pretrained(path), device).eval()


def load_sae(store: Store, keys: dict[str, str], device: str = "cpu") -> SparseCoder:
    path = store.local_dir(store.artifact_dir("transcoder", keys["transcoder"], "sae"))
    return tc_lib.load_transcoder(path).to(device).eval()


def explain_halves(seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split the explain split's sequences in two: the explainer sees the first half (even rank),
    the detection scorer judges on the second (odd rank), so scoring never reuses shown examples."""
    s = np.sort(seq_ids)
    return s[0::2], s[1::2]


# ---- contexts ----------------------------------------------------------------------------------
def dense(rows_ctx: np.ndarray, rows_lat: np.ndarray, values: np.ndarray, ctx_index: np.ndarray,
          shape: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """Scatter long-format (context_id, latent, value) rows into a dense [n_ctx, n_lat] array,
    joined by context id and latent id. `ctx_index` maps a context id to its row (context_index)."""
    out = np.full(shape, fill, dtype=np.float32)
    out[ctx_index[rows_ctx], rows_lat] = values
    return out


def context_index(context_ids: np.ndarray) -> np.ndarray:
    """A lookup array: index[context_id] = row, -1 elsewhere."""
    idx = np.full(int(context_ids.max()) + 1 if len(context_ids) else 1, -1, dtype=np.int64)
    idx[context_ids] = np.arange(len(context_ids))
    return idx


def context_ids(seq_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Context id of every (seq, pos), row-major: seq_id * seq_len + pos."""
    return (seq_ids[:, None] * seq_len + np.arange(seq_len)[None, :]).reshape(-1)


def sim_context_ids(cfg: RewriteConfig, split: str, seq_ids: np.ndarray) -> np.ndarray:
    """The contexts of a split that are simulated, calibrated and evaluated: every position, or for
    the calib and eval splits with simulate.eval_positions 'last' the last scored position of each
    sentence (calibration maps are fit on the position set that is evaluated)."""
    seq_len = cfg.corpus.seq_len
    if split in ("calib", "eval") and cfg.simulate.eval_positions == "last":
        return np.asarray(seq_ids, dtype=np.int64) * seq_len + eval_lib.scored_last_position(seq_len)
    return context_ids(seq_ids, seq_len)


def simulated_contexts(cfg: RewriteConfig, split: str, seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(context ids, mask) of the simulated contexts (sim_context_ids) among every (sequence, position)
    context of `seq_ids`, row-major: the mask selects them from context_ids / context_windows."""
    cids = context_ids(seq_ids, cfg.corpus.seq_len)
    keep = np.isin(cids, sim_context_ids(cfg, split, seq_ids))
    return cids[keep], keep


# ---- true activations --------------------------------------------------------------------------
def sparse_activations(store: Store, keys: dict[str, str], split: str, seq_len: int, cids: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row in `cids`, latent, act) of a split's cached activations at the contexts `cids`; the
    split's activations at other contexts are left out."""
    t = read_table(store, "activations", keys["activations"], "activations", columns=["seq_id", "pos", "latent", "act"],
               filters=pc.field("split") == split)
    c = t.column("seq_id").to_numpy().astype(np.int64) * seq_len + t.column("pos").to_numpy()
    idx = context_index(cids)
    row = np.where(c < len(idx), idx[np.minimum(c, len(idx) - 1)], -1)
    keep = row >= 0
    return row[keep], t.column("latent").to_numpy()[keep], t.column("act").to_numpy()[keep]


def true_activations(store: Store, keys: dict[str, str], split: str, seq_len: int, cids: np.ndarray,
                     num_latents: int) -> np.ndarray:
    """Dense true activations [len(cids), num_latents] of a split at the contexts `cids`, rows in `cids` order."""
    row, lat, act = sparse_activations(store, keys, split, seq_len, cids)
    out = np.zeros((len(cids), num_latents), dtype=np.float32)
    out[row, lat] = act
    return out


def true_sparse(store: Store, keys: dict[str, str], split: str, seq_len: int,
                cids: np.ndarray) -> stream_lib.SparseColumns:
    """A split's true activations at the contexts `cids` as sparse columns (rows in `cids` order)."""
    row, lat, act = sparse_activations(store, keys, split, seq_len, cids)
    return stream_lib.SparseColumns(row, lat, act, len(cids))


def true_sample(store: Store, keys: dict[str, str], seq_len: int, seq_ids: np.ndarray | None = None
                ) -> tuple[quantile_lib.TrueSample, int]:
    """The true sample quantile normalisation maps onto (calibrate.true_sample 'cache'): every cached
    token outside the eval split (explain, calib and the `sample` split), or only the sequences
    `seq_ids` of them; sparse. Returns it and its token count."""
    n_tokens = store.read_manifest("activations", keys["activations"])["metrics"]["n_tokens"]
    splits = [s for s in n_tokens if s != "eval"]
    flt = pc.field("split").isin(splits)
    if seq_ids is not None:
        flt = flt & pc.field("seq_id").isin(pa.array(np.asarray(seq_ids, dtype=np.int64)))
    t = read_table(store, "activations", keys["activations"], "activations", columns=["latent", "act"], filters=flt)
    m = int(sum(n_tokens[s] for s in splits)) if seq_ids is None else int(len(np.unique(seq_ids)) * seq_len)
    return quantile_lib.TrueSample(t.column("latent").to_numpy(), t.column("act").to_numpy(), m), m


def true_sample_sequences(store: Store, keys: dict[str, str]) -> np.ndarray:
    """The sequence ids of the true sample (every cached split but eval), sorted."""
    n_tokens = store.read_manifest("activations", keys["activations"])["metrics"]["n_tokens"]
    t = read_table(store, "activations", keys["activations"], "activations", columns=["seq_id"],
               filters=pc.field("split").isin([s for s in n_tokens if s != "eval"]))
    return np.unique(t.column("seq_id").to_numpy())


# ---- embeddings, predictions, LLM usage --------------------------------------------------------
def embeddings(store: Store, keys: dict[str, str], splits: tuple[str, ...]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context_ids, window embeddings, target-token embeddings) of the embedded contexts of `splits`."""
    t = read_table(store, "embed", keys["embed"], "contexts", filters=pc.field("split").isin(list(splits)))
    t = t.sort_by("context_id")
    dim = t.schema.field("embedding").type.list_size
    win = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    v = read_table(store, "embed", keys["embed"], "token_embeddings").sort_by("token")
    vocab_emb = v.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return t.column("context_id").to_numpy(), win, vocab_emb[t.column("token").to_numpy()]


def explained_embeddings(store: Store, keys: dict[str, str], cfg: RewriteConfig, lo: int = 0, hi: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(latent ids, explanation embeddings) of the explained latents in [lo, hi)."""
    t = read_table(store, "explain", keys["explain"], "explanations", filters=pc.field("status") == "explained")
    lat = t.column("latent").to_numpy()
    keep = (lat >= lo) & (lat < (hi if hi is not None else np.iinfo(np.int32).max))
    texts = [s for s, k in zip(t.column("explanation").to_pylist(), keep) if k]
    return lat[keep], emb_lib.embed_texts(texts, cfg.embedding)


def prediction_files(store: Store, keys: dict[str, str]) -> list[str]:
    """Paths of the shards' prediction files, in shard (latent range) order, from the stage manifest."""
    m = store.read_manifest("simulate", keys["simulate"])
    base = store.artifact_dir("simulate", keys["simulate"])
    return [f"{base}/{f['file']}" for f in m["files"] if f["file"].endswith("predictions.parquet")]


def _as_float32(t: pa.Table) -> pa.Table:
    """Stored predictions (float16 values) with their values as float32, what every reader computes on."""
    if "pred" in t.column_names and t.schema.field("pred").type != pa.float32():
        t = t.set_column(t.column_names.index("pred"), "pred", t.column("pred").cast(pa.float32()))
    return t


def read_predictions(store: Store, keys: dict[str, str], filters: Any = None,
                     columns: list[str] | None = None) -> pa.Table:
    """All shards' predictions (the stage manifest lists the shard files), values as float32.
    This holds them all in memory: stream over `prediction_files` for large runs."""
    return pa.concat_tables([_as_float32(store.read_parquet(f, filters=filters, columns=columns))
                             for f in prediction_files(store, keys)])


def shard_readers(store: Store, keys: dict[str, str]):
    """The simulation shards' prediction files, one ShardReader at a time (opened lazily)."""
    return (stream_lib.ShardReader(pq.ParquetFile(store.fs.open_input_file(f))) for f in prediction_files(store, keys))


def llm_with_usage(llm_cfg):
    """The (cached) LLM backend of a config section and a usage snapshot to diff against."""
    from .llm import get_llm

    llm = get_llm(llm_cfg)
    return llm, llm.usage.snapshot()


def llm_cost(llm, before: dict[str, float]) -> dict[str, Any]:
    """The manifest cost of the LLM calls since `before`: tokens in/out, seconds, calls (never a key)."""
    return {"llm_backend": llm.backend, "llm_model": llm.cfg.model, **llm.usage.since(before)}
