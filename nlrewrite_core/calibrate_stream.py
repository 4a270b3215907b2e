"""Calibration streamed over the simulation shards, with sparse true activations.

Every map is fit on its own latent's column alone (see fit_calibration), so fitting the latents
of each shard separately gives exactly the maps of one fit over all latents at once. The helpers
here turn one shard's long-format predictions and the sparse true activations into the dense
[contexts x shard latents] blocks that fit_calibration and apply_calibration take.

Holds the sparse true activations (:class:`SparseColumns`), one shard's dense predictions
(:class:`ShardBlock`, built by :func:`shard_block` / :func:`shard_block_batches`, read by
:class:`ShardReader`), the stream itself (:func:`stream_calibration`, :class:`StreamResult`) and
:func:`long_table`. The maps (methods, fitting, applying, table I/O) are in
:mod:`nlrewrite_core.calibrate`; the true sample of quantile normalisation in
:mod:`nlrewrite_core.quantile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .calibrate import apply_calibration, fit_calibration, maps_to_table
from .quantile import TrueSample


class SparseColumns:
    """Sparse values (row, latent, value), e.g. the true activations of a split, from which dense
    [n_rows, len(latents)] blocks of chosen latents are cut without ever building [n_rows x all
    latents]. Memory: the sparse entries, sorted by latent once."""

    def __init__(self, rows: np.ndarray, latents: np.ndarray, values: np.ndarray, n_rows: int):
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError("sparse rows outside [0, n_rows)")
        order = np.argsort(latents, kind="stable")
        self.rows, self.latents = rows[order], np.asarray(latents, dtype=np.int64)[order]
        self.values = np.asarray(values, dtype=np.float32)[order]
        self.n_rows = n_rows

    def dense(self, latents: np.ndarray) -> np.ndarray:
        """float32 [n_rows, len(latents)]: column j holds latent latents[j] (zero where absent).
        `latents` must be sorted and unique."""
        latents = np.asarray(latents, dtype=np.int64)
        out = np.zeros((self.n_rows, len(latents)), dtype=np.float32)
        if not len(latents):
            return out
        a, b = np.searchsorted(self.latents, [latents[0], latents[-1] + 1])
        lat = self.latents[a:b]
        col = np.searchsorted(latents, lat)
        hit = (col < len(latents)) & (latents[np.minimum(col, len(latents) - 1)] == lat)
        out[self.rows[a:b][hit], col[hit]] = self.values[a:b][hit]
        return out


@dataclass(frozen=True)
class ShardBlock:
    """One shard's predictions, dense: calib rows [n_calib, L] and eval rows [n_eval, L], columns
    the shard's latents (sorted ids); NaN where a prediction is missing (a failed answer)."""

    latents: np.ndarray
    calib: np.ndarray
    eval: np.ndarray

    def failed_fraction(self) -> np.ndarray:
        """Per latent, the fraction of its calib and eval contexts without a prediction."""
        n = self.calib.shape[0] + self.eval.shape[0]
        return (np.isnan(self.calib).sum(0) + np.isnan(self.eval).sum(0)) / max(n, 1)

    def columns(self, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(calib, eval) predictions of the given latents (a sorted subset of this shard's)."""
        col = np.searchsorted(self.latents, latents)
        return self.calib[:, col], self.eval[:, col]


class ShardReader:
    """A shard's prediction file read in pieces: its latent ids first (one small column), then its
    row groups (context blocks) one at a time, so a shard's long rows are never all in memory."""

    def __init__(self, parquet_file):
        self.file = parquet_file

    def latents(self) -> np.ndarray:
        return np.unique(self.file.read(columns=["latent"]).column("latent").to_numpy())

    def batches(self):
        for i in range(self.file.num_row_groups):
            yield self.file.read_row_group(i, columns=["context_id", "latent", "pred"])


def shard_block(context_ids: np.ndarray, latents: np.ndarray, pred: np.ndarray, calib_cids: np.ndarray,
                eval_cids: np.ndarray) -> ShardBlock:
    """Dense calib and eval blocks of one shard's long-format predictions, joined by context id and
    latent id (rows in calib_cids / eval_cids order). Predictions of other contexts are ignored;
    a (context, latent) pair given twice is an error."""
    import pyarrow as pa

    t = pa.table({"context_id": np.asarray(context_ids), "latent": np.asarray(latents), "pred": np.asarray(pred)})
    return shard_block_batches(np.unique(latents), [t], calib_cids, eval_cids)


def shard_block_batches(lat_ids: np.ndarray, batches, calib_cids: np.ndarray, eval_cids: np.ndarray) -> ShardBlock:
    """`shard_block` over a shard given as its sorted latent ids and an iterable of long-format
    tables (context_id, latent, pred): each batch is scattered into the dense block and dropped."""
    lat_ids = np.asarray(lat_ids, dtype=np.int64)
    lo = int(lat_ids[0]) if lat_ids.size else 0
    lookup = np.full(int(lat_ids[-1]) - lo + 1 if lat_ids.size else 0, -1, dtype=np.int64)
    lookup[lat_ids - lo] = np.arange(len(lat_ids))
    all_cids = np.concatenate([calib_cids, eval_cids]).astype(np.int64)
    index = np.full(int(all_cids.max(initial=-1)) + 1, -1, dtype=np.int64)
    index[all_cids] = np.arange(len(all_cids))
    out = np.full((len(all_cids), len(lat_ids)), np.nan, dtype=np.float32)
    flat_out = out.reshape(-1)
    n_values = 0
    for t in batches:
        cid = t.column("context_id").to_numpy()
        lat = t.column("latent").to_numpy()
        known = (lat >= lo) & (lat - lo < len(lookup))
        col = np.where(known, lookup[np.where(known, lat - lo, 0)], -1)
        if (col < 0).any():
            raise ValueError("a batch holds latents outside the shard's latent ids")
        inside = cid < len(index)
        row = np.where(inside, index[np.where(inside, cid, 0)], -1)
        keep = row >= 0
        values = t.column("pred").to_numpy().astype(np.float32)[keep]
        if not np.isfinite(values).all():
            raise ValueError("predictions contain NaN or inf")
        flat_out[row[keep] * len(lat_ids) + col[keep]] = values
        n_values += len(values)
        del t, cid, lat, col, row, keep, values
    if np.count_nonzero(~np.isnan(out)) != n_values:
        raise ValueError("a shard holds two predictions for one (context, latent) pair")
    n = len(calib_cids)
    return ShardBlock(lat_ids, out[:n], out[n:])


@dataclass
class StreamResult:
    """What :func:`stream_calibration` fit: maps tables per method, calibrated latents, latents
    left out (failed predictions above the allowed fraction, or no calib prediction at all),
    latents kept with some failed contexts (fit without them; their eval contexts are left out
    of the calibrated table and patched as 0 by evaluate), failed contexts kept, calib
    predictions fit, seconds per method (fit only)."""

    maps: dict[str, list[pa.Table]]
    latents: list[np.ndarray]
    excluded: list[np.ndarray]
    with_failures: list[np.ndarray] = field(default_factory=list)
    n_failed_kept: int = 0
    n_fit: int = 0
    fit_seconds: dict[str, float] = field(default_factory=dict)


def stream_calibration(shards, methods: list[str], n_knots: int, calib_cids: np.ndarray, eval_cids: np.ndarray,
                       true_calib: SparseColumns, write, *, sample: TrueSample | None = None,
                       max_failed_fraction: float = 0.0) -> StreamResult:
    """Fit every method's maps shard by shard and write the calibrated eval predictions.

    ``shards`` yields, per simulation shard, a long-format prediction table (context_id, latent,
    pred) holding all predictions of its latents, or a :class:`ShardReader` (read a row group at
    a time). A missing prediction is a failed one: a latent whose failed fraction (over its calib
    and eval contexts) exceeds ``max_failed_fraction`` is left out (``excluded``); below it, its
    maps are fit without the failed calib contexts and its failed eval contexts get no row.
    ``sample`` is the true sample the quantile methods map onto (None: the calib contexts' own true
    values). ``write`` receives one table per (shard, method): context_id, latent, pred (float32),
    method. Memory: one shard's dense [calib + eval contexts x shard latents]. Equal, map for map,
    to one :func:`fit_calibration` over all latents at once."""
    import time

    res = StreamResult({m: [] for m in methods}, [], [], fit_seconds={m: 0.0 for m in methods})
    for t in shards:
        if isinstance(t, ShardReader):
            block = shard_block_batches(t.latents(), t.batches(), calib_cids, eval_cids)
        else:
            block = shard_block(t.column("context_id").to_numpy(), t.column("latent").to_numpy(),
                                t.column("pred").to_numpy(), calib_cids, eval_cids)
        del t
        frac = block.failed_fraction()
        no_calib = np.isnan(block.calib).all(axis=0)
        ok = (frac <= max_failed_fraction) & ~no_calib
        latents = block.latents[ok]
        res.latents.append(latents)
        res.excluded.append(block.latents[~ok])
        res.with_failures.append(block.latents[ok & (frac > 0)])
        if not len(latents):
            continue
        pred_c, pred_e = block.columns(latents)
        del block
        res.n_failed_kept += int(np.isnan(pred_c).sum() + np.isnan(pred_e).sum())
        true_c = true_calib.dense(latents)
        res.n_fit += int((~np.isnan(pred_c)).sum())
        for method in methods:
            t0 = time.perf_counter()
            maps = fit_calibration(method, pred_c, true_c, n_knots, latents=latents, sample=sample)
            res.fit_seconds[method] += time.perf_counter() - t0
            res.maps[method].append(maps_to_table(maps))
            out = apply_calibration(maps, pred_e, latents=latents)
            write(long_table(eval_cids, latents, out).append_column(
                "calibration", pa.repeat(pa.scalar(method, pa.string()), int((~np.isnan(out)).sum()))))
    return res


def long_table(context_ids: np.ndarray, latents: np.ndarray, values: np.ndarray) -> pa.Table:
    """Dense [n_contexts, n_latents] values as long rows (context_id, latent, pred float32), grouped by
    latent; NaN entries (failed predictions) get no row."""
    keep = ~np.isnan(values.T)
    return pa.table({
        "context_id": pa.array(np.broadcast_to(context_ids.astype(np.int64)[None, :], keep.shape)[keep]),
        "latent": pa.array(np.broadcast_to(latents.astype(np.int32)[:, None], keep.shape)[keep]),
        "pred": pa.array(values.T[keep].astype(np.float32)),
    })
