"""The `embedding` simulator: predicted activation of a latent at a context from its explanation.

The prediction is the similarity of the explanation to the context (the window ending at the
target token, mixed with the target token itself), clipped to [0, 1] and mapped linearly onto
[0, max_act] -- the analogue of the paper's E/9 * max_act with E the expected 0-9 answer.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .embedding import similarity

if TYPE_CHECKING:
    from .llm.prompts import PromptOrder

PREDICTION_SCHEMA = pa.schema([("context_id", pa.int64()), ("latent", pa.int32()), ("pred", pa.float32())])
CALIBRATED_SCHEMA = PREDICTION_SCHEMA.append(pa.field("calibration", pa.string()))
"""The calibrate stage's `calibrated` table: calibrated eval predictions of each method."""
STORED_SCHEMA = pa.schema([("context_id", pa.int64()), ("latent", pa.int32()), ("pred", pa.float16())])
"""How predictions are stored on disk: float16 values (readers cast them to float32). The ids
are delta-encoded (a block's context ids run up by one, latent ids are constant runs), so a
prediction costs little more than its two value bytes before compression."""
PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd", "compression_level": 3, "use_dictionary": False,
    "column_encoding": {"context_id": "DELTA_BINARY_PACKED", "latent": "DELTA_BINARY_PACKED",
                        "pred": "BYTE_STREAM_SPLIT"},
}


def context_windows(tokens: np.ndarray, window: int) -> list[tuple[int, int, int]]:
    """(row, start, end) for every position of every sequence: the window of at most `window`
    tokens that ends at (and includes) the target token."""
    n_seq, seq_len = tokens.shape
    return [(r, max(0, p - window + 1), p + 1) for r in range(n_seq) for p in range(seq_len)]


def linear_prediction(sim: np.ndarray, max_act: np.ndarray) -> np.ndarray:
    """Map similarities [n_ctx, n_lat] in [-1, 1] to activations in [0, max_act] (clip at 0 and 1).

    The end points are exact: sim <= 0 gives 0, sim >= 1 gives max_act.
    """
    return (np.clip(sim, 0.0, 1.0) * max_act[None, :].astype(np.float32)).astype(np.float32)


def simulate_block(expl_emb: np.ndarray, window_emb: np.ndarray, token_emb: np.ndarray,
                   max_act: np.ndarray, token_weight: float) -> np.ndarray:
    """Predictions [n_ctx, n_lat] for a block of latents over all contexts."""
    return linear_prediction(similarity(expl_emb, window_emb, token_emb, token_weight), max_act)


def predictions_table(context_ids: np.ndarray, latents: np.ndarray, pred: np.ndarray,
                      schema: pa.Schema = PREDICTION_SCHEMA) -> pa.Table:
    """Long-format predictions, one row per (context, latent), grouped by latent. `schema` picks
    the value type (float32, or float16 for storage: STORED_SCHEMA)."""
    if not np.isfinite(pred).all():
        raise ValueError("simulator produced non-finite predictions")
    n_ctx, n_lat = pred.shape
    dtype = np.float16 if schema.field("pred").type == pa.float16() else np.float32
    values = np.ascontiguousarray(pred.T, dtype=dtype).reshape(-1)
    if dtype == np.float16 and not np.isfinite(values).all():
        raise ValueError("predictions overflow float16")
    return pa.table({
        "context_id": pa.array(np.tile(context_ids.astype(np.int64), n_lat)),
        "latent": pa.array(np.repeat(latents.astype(np.int32), n_ctx)),
        "pred": pa.array(values),
    }, schema=schema)

CALIBRATED_OPTIONS: dict[str, Any] = {
    "compression": "zstd", "compression_level": 1, "use_dictionary": ["calibration"],
    "column_encoding": {"context_id": "DELTA_BINARY_PACKED", "latent": "DELTA_BINARY_PACKED",
                        "pred": "BYTE_STREAM_SPLIT"},
}
"""Calibrated eval predictions keep float32 values (what evaluate patches in); ids delta-encoded."""


class _HashingSink:
    """A write-only file object that hashes (sha256) and counts the bytes on their way to `sink`:
    the file's manifest hash without reading it back (on S3 that would download the whole file)."""

    def __init__(self, sink: Any):
        self.sink, self.sha, self.size, self.closed = sink, hashlib.sha256(), 0, False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.sink.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.sink.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:  # the owner closes the real sink
        self.closed = True


class BlockWriter:
    """Streams tables into one Parquet file, a row group per call to `write`, never holding more
    than one block. The file appears whole or not at all: a local file is written under a
    temporary name and renamed; on S3 the upload completes on close. `close()` returns
    (rows, sha256, bytes), hashed as the bytes are written."""

    def __init__(self, fs, path: str, schema: pa.Schema = STORED_SCHEMA, local: bool = True, **options: Any):
        self.fs, self.path, self.local = fs, path, local
        if local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            self.sink = open(self.tmp, "wb")  # noqa: SIM115 - held open for the writer's life, closed in close()/abort()
        else:
            self.sink = fs.open_output_stream(path)
        opts = {**(PARQUET_OPTIONS if schema == STORED_SCHEMA else
                   CALIBRATED_OPTIONS if schema == CALIBRATED_SCHEMA else {"compression": "zstd"}), **options}
        self.hashing = _HashingSink(self.sink)
        self.writer = pq.ParquetWriter(self.hashing, schema, **opts)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows

    def close(self) -> tuple[int, str, int]:
        self.writer.close()
        if self.local:
            self.sink.flush()
            os.fsync(self.sink.fileno())
            self.sink.close()
            os.replace(self.tmp, self.path)
        else:
            self.sink.close()
        return self.rows, self.hashing.sha.hexdigest(), self.hashing.size

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if self.local:
                self.sink.close()
                if os.path.exists(self.tmp):
                    os.remove(self.tmp)


def context_blocks(n_contexts: int, block: int) -> Iterator[slice]:
    """Row ranges of the context blocks: [0, block), [block, 2 block), ..., the last one shorter."""
    for a in range(0, n_contexts, block):
        yield slice(a, min(a + block, n_contexts))


def simulate_shard_blocks(context_ids: np.ndarray, window_emb: np.ndarray, token_emb: np.ndarray,
                          latents: np.ndarray, expl_emb: np.ndarray, max_act: np.ndarray, token_weight: float,
                          context_block: int) -> Iterator[pa.Table]:
    """One shard's predictions as dense blocks (context block x the shard's latents), each a
    stored-schema table: only one block is ever in memory."""
    for rows in context_blocks(len(context_ids), context_block):
        pred = simulate_block(expl_emb, window_emb[rows], token_emb[rows], max_act, token_weight)
        yield predictions_table(context_ids[rows], latents, pred, STORED_SCHEMA)


# ---- the `llm` simulator (the paper's prompt) ------------------------------------------------------------
FAILED_SCHEMA = pa.schema([("context_id", pa.int64()), ("latent", pa.int32()), ("reason", pa.string())])


def context_suffixes(tokens: np.ndarray, window: int, decode, keep: np.ndarray | None = None) -> list[str]:
    """The simulator prompt's context part (`prompts.simulator_context`) for every (sequence, position),
    row-major, or only where the boolean mask `keep` (over those contexts) is set: the window ending at
    the target token, the target token marked <<tok>>. It starts the suffix in the `explanation_first`
    order and ends the shared prefix in `context_first`."""
    from .llm import prompts as P

    windows = context_windows(tokens, window)
    if keep is not None:
        windows = [w for w, k in zip(windows, keep) if k]
    return [P.simulator_context(decode(tokens[r, a:b - 1].tolist()), decode([int(tokens[r, b - 1])]))
            for r, a, b in windows]


PROMPTS_PER_CALL = 16384
"""llm_predictions: prompts per `top_logprobs` call, rounded to whole prefix groups (at least one)."""


def llm_predictions(latents: np.ndarray, explanations: list[str], contexts: list[str], context_ids: np.ndarray,
                    max_act: np.ndarray, llm, renormalize: bool = True,
                    order: PromptOrder = "explanation_first") -> tuple[pa.Table, pa.Table]:
    """Predictions of `latents` on every context (`contexts`: the context parts of `context_suffixes`):
    one prompt per (context, latent). `order` (prompts.PromptOrder) picks the shared prefix: the
    explanation (shared by a latent's contexts) or the context (shared by the latents); each call
    holds whole groups of prompts that share a prefix, adjacent. E is the expected digit over the
    top logprobs (renormalized over the digits unless `renormalize` is False, the paper's way), mapped
    linearly onto [0, max_act]. A prompt with no digit among its top logprobs is a failed prediction:
    a row of the second table, never a value. Both tables list rows by latent, then context, in
    either order. Returns (predictions, failed)."""
    from .llm import prompts as P

    n_lat, n_ctx = len(latents), len(contexts)
    pred = np.zeros((n_lat, n_ctx), dtype=np.float32)
    fail = np.zeros((n_lat, n_ctx), dtype=np.int8)
    outer, inner = (n_lat, n_ctx) if order == "explanation_first" else (n_ctx, n_lat)
    step = max(1, PROMPTS_PER_CALL // max(inner, 1))
    for a in range(0, outer, step):
        firsts = np.arange(a, min(a + step, outer))
        o, n = np.repeat(firsts, inner), np.tile(np.arange(inner), len(firsts))
        lat_i, ctx_i = (o, n) if order == "explanation_first" else (n, o)
        tops = llm.top_logprobs([P.simulator_prompt(explanations[j], contexts[i], order)
                                 for j, i in zip(lat_i, ctx_i)])
        for j, i, top in zip(lat_i, ctx_i, tops):
            _digit_prediction(top, renormalize, float(max_act[j]), pred, fail, j, i)
    return _prediction_tables(latents, context_ids, pred, fail)


FAIL_REASONS = ("no digit 0-9 among the top logprobs",
                "activation slot not on a token boundary of the simulator's tokenization")
"""Why a prediction failed (the `reason` column of the failed table), by code 1, 2 (0: not failed)."""


def _digit_prediction(top: dict[str, float] | None, renormalize: bool, max_act: float, pred: np.ndarray,
                      fail: np.ndarray, j: int, i: int) -> None:
    """Write the prediction of latent row j at context column i from one distribution (`top`; None: the
    backend found no token at the slot), or its failure code."""
    from .llm import prompts as P

    if top is None:
        fail[j, i] = 2
        return
    e = P.expected_digit(top, renormalize)
    if e is None:
        fail[j, i] = 1
    else:
        pred[j, i] = P.digit_to_activation(e, max_act)


def _prediction_tables(latents: np.ndarray, context_ids: np.ndarray, pred: np.ndarray, fail: np.ndarray
                       ) -> tuple[pa.Table, pa.Table]:
    """(predictions, failed) of dense [latent, context] predictions and failure codes (FAIL_REASONS), rows
    by latent, then context."""
    done = fail == 0
    if not (np.isfinite(pred[done]).all() and (pred[done] >= 0).all()):
        raise ValueError("simulator produced non-finite or negative predictions")

    def keys(mask: np.ndarray) -> dict[str, pa.Array]:
        lat_i, ctx_i = np.nonzero(mask)  # by latent, then context
        return {"context_id": pa.array(np.asarray(context_ids)[ctx_i], pa.int64()),
                "latent": pa.array(np.asarray(latents)[lat_i], pa.int32())}

    table = pa.table({**keys(done), "pred": pa.array(pred[done], pa.float32())}, schema=PREDICTION_SCHEMA)
    reason = pa.array([FAIL_REASONS[c - 1] for c in fail[~done].tolist()], pa.string())
    return table, pa.table({**keys(~done), "reason": reason}, schema=FAILED_SCHEMA)


SLOT_PROMPTS_PER_CALL = 2048
"""llm_all_at_once_predictions: prompts per `slot_logprobs` call, rounded to whole latents (at least one)."""


def sentence_token_texts(tokens: np.ndarray, decode_token) -> list[list[str]]:
    """Each sequence's token texts (`decode_token(id)`, decoded once per distinct id), for all-at-once prompts."""
    texts = {int(t): decode_token(int(t)) for t in np.unique(tokens)}
    return [[texts[int(t)] for t in row] for row in tokens]


def llm_all_at_once_predictions(latents: np.ndarray, explanations: list[str], sentences: list[list[str]],
                                read: list[np.ndarray], context_ids: np.ndarray, max_act: np.ndarray, llm,
                                renormalize: bool = True) -> tuple[pa.Table, pa.Table]:
    """The all-at-once simulator: predictions of `latents` at the positions `read[s]` (sorted) of each
    sentence s (`sentences[s]`: its token texts), from one prompt per (latent, sentence)
    (`prompts.all_at_once_prompt`) whose activation slots are all read in one pass (`LLM.slot_logprobs`).
    `context_ids` names the contexts read, sentence by sentence, positions in order. The prediction at a
    slot is computed as in `llm_predictions` (expected digit over the top logprobs, renormalized unless
    `renormalize` is False, mapped linearly onto [0, max_act]); a slot with no digit among its top
    logprobs, or that the backend could not place on a token, is a failed prediction. A position's
    context is the sentence up to it (not the `llm` simulator's 32-token window). Prompts of a latent
    share its prefix (the instructions and the explanation) and are sent together. Returns (predictions,
    failed), rows by latent, then context."""
    from .llm import prompts as P

    starts = np.concatenate([[0], np.cumsum([len(r) for r in read])]).astype(int)
    n_lat, n_ctx = len(latents), int(starts[-1])
    if len(context_ids) != n_ctx:
        raise ValueError(f"{len(context_ids)} context ids for {n_ctx} positions read")
    pred = np.zeros((n_lat, n_ctx), dtype=np.float32)
    fail = np.zeros((n_lat, n_ctx), dtype=np.int8)
    sents = [s for s in range(len(sentences)) if len(read[s])]
    step = max(1, SLOT_PROMPTS_PER_CALL // max(len(sents), 1))
    for a in range(0, n_lat, step):
        pairs = [(j, s) for j in range(a, min(a + step, n_lat)) for s in sents]
        res = llm.slot_logprobs([P.all_at_once_prompt(explanations[j], sentences[s], read[s]) for j, s in pairs])
        for (j, s), tops in zip(pairs, res):
            if len(tops) != len(read[s]):
                raise ValueError(f"{llm.name} returned {len(tops)} slots for {len(read[s])} positions read")
            for i, top in zip(range(starts[s], starts[s + 1]), tops):
                _digit_prediction(top, renormalize, float(max_act[j]), pred, fail, j, i)
    return _prediction_tables(latents, context_ids, pred, fail)
