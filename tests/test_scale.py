"""Scale: compact prediction shards, streaming calibration, shard boundaries."""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from nlrewrite_core import calibrate as C
from nlrewrite_core import calibrate_stream as CS
from nlrewrite_core import simulate as S


def _problem(n_calib=300, n_eval=120, n_lat=70, seed=0):
    rng = np.random.default_rng(seed)
    calib_cids = np.sort(rng.choice(10_000, n_calib, replace=False))
    eval_cids = np.setdiff1d(np.arange(10_000, 10_000 + 3 * n_eval, 3), calib_cids)[:n_eval]
    latents = np.sort(rng.choice(5_000, n_lat, replace=False))
    pred = rng.uniform(0, 5, (n_calib + n_eval, n_lat)).astype(np.float16).astype(np.float32)
    pred[rng.random(pred.shape) < 0.3] = 0.0
    true = np.where(rng.random((n_calib, n_lat)) < 0.05, rng.exponential(2.0, (n_calib, n_lat)), 0).astype(np.float32)
    return calib_cids, eval_cids, latents, pred, true


def _dense_split(store, keys, split: str, seq_len: int, num_latents: int):
    """In-memory reference: (context ids, raw predictions, true activations) of a split, dense
    [n_ctx, num_latents] in context_ids order, predictions joined by (context id, latent id), a
    missing one NaN."""
    import pyarrow.compute as pc

    from nlrewrite_core import artifacts

    seq_ids, _ = artifacts.load_tokens(store, keys, (split,))
    cids = artifacts.context_ids(seq_ids, seq_len)
    idx = artifacts.context_index(cids)
    pred = np.full((len(cids), num_latents), np.nan, dtype=np.float32)
    for f in artifacts.prediction_files(store, keys):
        p = store.read_parquet(f, filters=(pc.field("context_id") >= int(cids.min())) & (pc.field("context_id") <= int(cids.max())))
        c = p.column("context_id").to_numpy()
        keep = idx[c] >= 0
        pred[idx[c[keep]], p.column("latent").to_numpy()[keep]] = p.column("pred").to_numpy()[keep]
    return cids, pred, artifacts.true_activations(store, keys, split, seq_len, cids, num_latents)


@pytest.mark.parametrize("method", ["none", "quantile", "quantile-hf1", "isotonic", "affine"])
@pytest.mark.parametrize("shard", [7, 32, 70])
def test_streaming_calibration_equals_in_memory(method, shard):
    calib_cids, eval_cids, latents, pred, true = _problem()
    n_c = len(calib_cids)
    whole = C.fit_calibration(method, pred[:n_c], true, 33, latents=latents)
    whole_out = C.apply_calibration(whole, pred[n_c:], latents=latents)
    # The true activations as the activations table holds them: sparse (row, latent, act).
    r, c = np.nonzero(true)
    sparse = CS.SparseColumns(r, latents[c], true[r, c], n_c)
    cids = np.concatenate([calib_cids, eval_cids])
    tables, outs = [], []
    for a in range(0, len(latents), shard):
        lat = latents[a:a + shard]
        # The shard's long rows, shuffled: joins are by id, never by position.
        t = S.predictions_table(cids, lat, pred[:, a:a + shard], S.STORED_SCHEMA)
        perm = np.random.default_rng(a).permutation(len(t))
        block = CS.shard_block(t.column("context_id").to_numpy()[perm], t.column("latent").to_numpy()[perm],
                              t.column("pred").to_numpy()[perm], calib_cids, eval_cids)
        assert (block.failed_fraction() == 0).all() and np.array_equal(block.latents, lat)
        ok = block.latents
        pc_, pe_ = block.columns(ok)
        maps = C.fit_calibration(method, pc_, sparse.dense(ok), 33, latents=ok)
        tables.append(C.maps_to_table(maps))
        outs.append(C.apply_calibration(maps, pe_, latents=ok))
    import pyarrow as pa
    streamed = C.maps_from_table(pa.concat_tables(tables), method)
    ref = C.maps_from_table(C.maps_to_table(whole), method)
    assert np.array_equal(streamed.latents, ref.latents)
    assert np.array_equal(streamed.x, ref.x) and np.array_equal(streamed.y, ref.y)
    assert np.array_equal(np.concatenate(outs, axis=1), whole_out)


def test_shard_block_rejects_duplicates_and_marks_missing():
    cids = np.arange(6)
    t = S.predictions_table(cids, np.array([3, 9]), np.ones((6, 2), np.float32))
    c, l, p = (t.column(k).to_numpy() for k in ("context_id", "latent", "pred"))
    with pytest.raises(ValueError, match="two predictions"):
        CS.shard_block(np.r_[c, c[:1]], np.r_[l, l[:1]], np.r_[p, p[:1]], cids[:4], cids[4:])
    block = CS.shard_block(c[1:], l[1:], p[1:], cids[:4], cids[4:])  # (context 0, latent 3) failed
    assert block.latents.tolist() == [3, 9] and block.failed_fraction().tolist() == [1 / 6, 0.0]
    assert np.isnan(block.calib[0, 0]) and np.isfinite(block.calib[:, 1]).all()


def test_streaming_calibration_fits_around_failed_predictions():
    """A latent below simulate.max_failed_fraction is fit without its failed contexts and its failed eval
    contexts get no calibrated row; above it, the latent is excluded; both are counted."""
    calib_cids, eval_cids, latents, pred, true = _problem(n_lat=4)
    n_c = len(calib_cids)
    pred[3, 1] = np.nan  # one failed calib prediction of latent 1 (1/420 of its contexts)
    pred[n_c + 2, 1] = np.nan  # and one failed eval prediction
    pred[: n_c // 2, 2] = np.nan  # half of latent 2's calib contexts failed
    cids = np.concatenate([calib_cids, eval_cids])
    rows = [(c, latents[j], pred[i, j]) for j in range(4) for i, c in enumerate(cids) if not np.isnan(pred[i, j])]
    import pyarrow as pa
    t = pa.table({"context_id": np.array([r[0] for r in rows]), "latent": np.array([r[1] for r in rows]),
                  "pred": np.array([r[2] for r in rows], dtype=np.float32)})
    r, c = np.nonzero(true)
    sparse = CS.SparseColumns(r, latents[c], true[r, c], n_c)
    written = []
    res = CS.stream_calibration([t], ["quantile", "isotonic"], 33, calib_cids, eval_cids, sparse, written.append,
                               max_failed_fraction=0.05)
    assert np.concatenate(res.excluded).tolist() == [latents[2]]
    assert np.concatenate(res.with_failures).tolist() == [latents[1]] and res.n_failed_kept == 2
    out = pa.concat_tables(written)
    lat1 = out.filter(pa.compute.equal(out["latent"], int(latents[1])))
    assert len(lat1) == 2 * (len(eval_cids) - 1) and int(eval_cids[2]) not in lat1["context_id"].to_pylist()
    keep = ~np.isnan(pred[:n_c, 1])
    alone = C.fit_calibration("quantile", pred[:n_c][keep][:, [1]], true[keep][:, [1]], 33)
    streamed = C.maps_from_table(pa.concat_tables(res.maps["quantile"]), "quantile")
    row = int(np.flatnonzero(streamed.latents == latents[1])[0])
    probe = np.linspace(-1, 6, 50, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(C.apply_calibration(streamed, probe, latents=latents[[1]]),
                                  C.apply_calibration(alone, probe))
    assert row >= 0


@pytest.mark.parametrize("n_ctx,n_lat,shard_latents,context_block", [
    (64, 32, 8, 16),  # divides both
    (67, 29, 8, 16),  # divides neither
    (50, 5, 7, 100),  # one shard, one block
    (33, 40, 1, 1),   # one latent, one context at a time
])
def test_shard_boundaries_cover_every_pair_once(tmp_path, n_ctx, n_lat, shard_latents, context_block):
    from nlrewrite_core.stages import shard_ranges

    rng = np.random.default_rng(1)
    cids = np.sort(rng.choice(10 * n_ctx, n_ctx, replace=False))
    dim = 8
    win, tok = rng.normal(size=(n_ctx, dim)), rng.normal(size=(n_ctx, dim))
    expl = rng.normal(size=(n_lat, dim))
    max_act = rng.uniform(1, 3, n_lat).astype(np.float32)
    seen = []
    for i, (lo, hi) in enumerate(shard_ranges(n_lat, shard_latents)):
        path = str(tmp_path / f"shard-{i:05d}" / "predictions.parquet")
        w = S.BlockWriter(pafs.LocalFileSystem(), path)
        for block in S.simulate_shard_blocks(cids, win, tok, np.arange(lo, hi), expl[lo:hi], max_act[lo:hi], 0.5,
                                             context_block):
            w.write(block)
        rows, sha, size = w.close()
        t = pq.read_table(path)
        assert rows == t.num_rows == n_ctx * (hi - lo)
        assert pq.ParquetFile(path).num_row_groups == -(-n_ctx // context_block)
        assert t.schema.field("pred").type == S.STORED_SCHEMA.field("pred").type
        seen.append(np.stack([t.column("context_id").to_numpy(), t.column("latent").to_numpy()], 1))
    pairs = np.concatenate(seen)
    assert len(pairs) == n_ctx * n_lat
    assert len(np.unique(pairs, axis=0)) == len(pairs)
    assert set(map(tuple, pairs)) == {(int(c), l) for c in cids for l in range(n_lat)}
    # The blocks' values are the dense simulation's, in float16.
    full = S.simulate_block(expl, win, tok, max_act, 0.5).astype(np.float16)
    t = pq.read_table(str(tmp_path / "shard-00000" / "predictions.parquet"))
    row = np.searchsorted(cids, t.column("context_id").to_numpy())
    assert np.array_equal(t.column("pred").to_numpy(), full[row, t.column("latent").to_numpy()])


def test_block_writer_abort_leaves_no_file(tmp_path):
    path = str(tmp_path / "p.parquet")
    w = S.BlockWriter(pafs.LocalFileSystem(), path)
    w.write(S.predictions_table(np.arange(4), np.arange(2), np.ones((4, 2), np.float32), S.STORED_SCHEMA))
    w.abort()
    assert not list(tmp_path.iterdir())


def test_micro_run_compact_shards_and_streaming_calibration(micro_run):
    """On the finished micro run (read only): compact shards, and the streamed `calibrated` table equals
    an in-memory calibration over the dense matrices. (A redone shard's predictions equal the
    uninterrupted run's: tests/test_flow.py's crash-resume test.)"""
    import pyarrow.compute as pc

    from nlrewrite_core import artifacts, stages
    from nlrewrite_core.config import load_config
    from nlrewrite_core.query import query
    from nlrewrite_core.storage import Store

    storage, _ = micro_run
    store, cfg = Store(storage), load_config("micro")
    keys = stages.plan(cfg)
    n_lat = artifacts.num_latents(store, keys)
    ranges = stages.shard_ranges(n_lat, cfg.simulate.shard_latents)
    assert len(ranges) >= 3
    for i in range(len(ranges)):
        m = store.read_manifest("simulate", keys["simulate"], f"shard-{i:05d}")
        assert m["metrics"]["bytes_per_prediction"] <= 2.5
    cols, rows = query(store, "micro-test", "select count(*), count(distinct (context_id, latent)), "
                                            "typeof(any_value(pred)) from predictions")
    assert rows[0][0] == rows[0][1] and rows[0][2] == "FLOAT"

    # Streaming calibration (what run_calibrate wrote) == one in-memory fit over dense matrices.
    seq_len = cfg.corpus.seq_len
    cal = artifacts.read_table(store, "calibrate", keys["calibrate"], "calibrated")
    _, cp, ct = _dense_split(store, keys, "calib", seq_len, n_lat)
    ecids, ep, _ = _dense_split(store, keys, "eval", seq_len, n_lat)
    live = np.flatnonzero(~(np.isnan(cp).all(0) | np.isnan(ep).all(0)))
    sample, _ = artifacts.true_sample(store, keys, seq_len)  # what `quantile` maps onto (calibrate.true_sample: cache)
    for method in cfg.calibrate.methods:
        maps = C.fit_calibration(method, cp[:, live], ct[:, live], cfg.calibrate.n_knots, latents=live, sample=sample)
        want = C.apply_calibration(maps, ep[:, live], latents=live)
        t = cal.filter(pc.field("calibration") == method)
        got = artifacts.dense(t.column("context_id").to_numpy(), t.column("latent").to_numpy(),
                           t.column("pred").to_numpy(), artifacts.context_index(ecids), ep.shape, fill=np.nan)
        assert np.array_equal(got[:, live], want)


@pytest.mark.slow
def test_stage_memory_bounded_as_contexts_double(tmp_path):
    """Peak RSS of simulate and calibrate (each in its own process, benchmarks/scale.py): what
    doubling the contexts adds is one shard's worth (contexts x 512 shard latents), the same
    whatever the number of latents, i.e. never a copy of all predictions."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale

    rss = {}
    for n_lat in (1024, 4096):
        for n_calib in (3000, 6000):
            d = tmp_path / f"{n_lat}-{n_calib}"
            d.mkdir()
            for stage in ("setup", "simulate", "calibrate"):
                rss[(n_lat, n_calib, stage)] = scale.run_child(stage, d, n_lat, 500, n_calib)["peak_rss_mib"]
    for stage in ("simulate", "calibrate"):
        growth = {n: rss[(n, 6000, stage)] - rss[(n, 3000, stage)] for n in (1024, 4096)}
        # 3,000 more contexts over 4,096 latents is 12M more predictions: 47 MiB as float32, 160 MiB
        # as long rows. A stage that held them all would grow by that much more at 4,096 latents.
        assert growth[4096] - growth[1024] < 24, (stage, growth, rss)
        assert growth[4096] < 200, (stage, growth, rss)
