"""The calibrate stage: per-latent maps from simulated to true activations fit on the calib split, streamed
over the simulation shards, applied to the eval predictions (nlrewrite_core.calibrate, calibrate_stream)."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import (
    artifacts as art,
    calibrate as calib_lib,
    calibrate_stream as stream_lib,
    quantile as quantile_lib,
    simulate as sim_lib,
    stages,
)
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..storage import Store

log = logging.getLogger("nlrewrite")


def calibrate_shards(store: Store, cfg: RewriteConfig, keys: dict[str, str], calib_cids: np.ndarray,
                     eval_cids: np.ndarray, methods: list[str], write,
                     sample: quantile_lib.TrueSample | None) -> stream_lib.StreamResult:
    """stream_lib.stream_calibration over the simulation shards with the run's settings (the calibrate
    stage and the sample-size ablations share it)."""
    return stream_lib.stream_calibration(
        art.shard_readers(store, keys), methods, cfg.calibrate.n_knots, calib_cids, eval_cids,
        art.true_sparse(store, keys, "calib", cfg.corpus.seq_len, calib_cids), write, sample=sample,
        max_failed_fraction=cfg.simulate.max_failed_fraction)


def calibrate_predictions(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Per-latent maps fit on the calib split, streaming over the simulation shards: a shard's
    latents are calibrated from that shard's predictions and those latents' (sparse) true
    activations alone, so only one shard's dense [contexts x shard latents] block is ever in
    memory. The calibrated eval predictions are written a shard at a time; a failed eval
    prediction gets no row."""
    if ref := stages.reuse(store, "calibrate", keys):
        return ref
    w = stages.writer(store, "calibrate", cfg, keys)
    calib_cids = art.sim_context_ids(cfg, "calib", art.load_tokens(store, keys, ("calib",))[0])
    eval_cids = art.sim_context_ids(cfg, "eval", art.load_tokens(store, keys, ("eval",))[0])
    if cfg.calibrate.true_sample == "cache":
        sample, m = art.true_sample(store, keys, cfg.corpus.seq_len)
    else:
        sample, m = None, len(calib_cids)
    writer = sim_lib.BlockWriter(store.fs, f"{w.dir}/calibrated.parquet", schema=sim_lib.CALIBRATED_SCHEMA,
                                 local=not store.is_s3)
    t_start = time.perf_counter()
    try:
        res = calibrate_shards(store, cfg, keys, calib_cids, eval_cids, list(cfg.calibrate.methods), writer.write,
                               sample)
    except BaseException:
        writer.abort()
        raise
    del sample
    rows, sha, _ = writer.close()
    w.files.append({"name": "calibrated", "file": "calibrated.parquet", "rows": rows, "sha256": sha})

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    latents, excluded, with_failures = cat(res.latents), cat(res.excluded), cat(res.with_failures)
    if len(excluded):
        # Too many failed predictions to simulate the latent faithfully: left out of calibration (so
        # never patched: it keeps its true value in the paper's accounting, 0 in the strict one) and counted.
        log.warning("calibrate: %d latents have more than %g failed predictions and are not simulated: %s",
                    len(excluded), cfg.simulate.max_failed_fraction, excluded[:20].tolist())
    n_active = art.read_table(store, "activations", keys["activations"], "latent_stats", columns=["latent", "n_active"],
                      filters=pc.field("split") == "calib")
    active_calib = n_active.column("latent").to_numpy()[n_active.column("n_active").to_numpy() > 0]
    no_calib_activity = np.setdiff1d(latents, active_calib)
    fit_seconds = {m_: round(v, 3) for m_, v in res.fit_seconds.items()}
    total = time.perf_counter() - t_start
    n_fit = res.n_fit
    log.info("calibrate: %d methods on %d latents (%d calib predictions, true sample of %d tokens) in %.1fs, "
             "fit seconds %s", len(fit_seconds), len(latents), n_fit, m, total, fit_seconds)
    empty = pa.Table.from_pylist([], schema=calib_lib.TABLE_SCHEMA)
    w.table("calibration", pa.concat_tables([t for m_ in cfg.calibrate.methods for t in res.maps[m_]] or [empty]))
    return w.finish(metrics={"methods": list(cfg.calibrate.methods), "n_latents": int(len(latents)),
                             "n_latents_excluded_failed": int(len(excluded)), "excluded_latents": excluded.tolist(),
                             "n_latents_with_failed_contexts": int(len(with_failures)),
                             "n_failed_contexts_kept": int(res.n_failed_kept),
                             "n_latents_no_calib_activity": int(len(no_calib_activity)),
                             "max_failed_fraction": cfg.simulate.max_failed_fraction,
                             "true_sample": cfg.calibrate.true_sample, "n_true_sample_tokens": int(m),
                             "n_calib_contexts": int(len(calib_cids)), "fit_seconds": fit_seconds,
                             "n_calib_predictions": int(n_fit),
                             "fit_predictions_per_s": {m_: n_fit / max(v, 1e-9) for m_, v in fit_seconds.items()},
                             "predictions_per_s": n_fit / max(total, 1e-9)})
