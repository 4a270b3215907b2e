"""The activations stage: the transcoder's latents on the explain, calib, eval (and `sample`) splits, cached
sparse in one Parquet file, with per-latent statistics (nlrewrite_core.activations)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import activations as acts_lib, artifacts as art, stages
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..storage import Store

log = logging.getLogger("nlrewrite")


def cache_activations(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """Every non-zero latent activation of the cached splits, and per-latent statistics."""
    if ref := stages.reuse(store, "activations", keys):
        return ref

    w = stages.writer(store, "activations", cfg, keys)
    device = art.device(cfg)
    model = art.load_subject(store, keys, device)
    sae = art.load_sae(store, keys, device)
    layer = cfg.transcoder.layer
    schema = acts_lib.ACTIVATION_SCHEMA.append(pa.field("split", pa.string()))
    if cfg.activations.dtype == "float16":
        schema = schema.set(schema.get_field_index("act"), pa.field("act", pa.float16()))
    n_tokens: dict[str, int] = {}
    parts: list[pa.Table] = []  # only (split, latent, act) for the statistics: 3 narrow columns
    rows, t0 = 0, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nlrewrite-activations-") as tmp:  # removed however the stage ends
        tmp_path = Path(tmp) / "activations.parquet"
        with pq.ParquetWriter(tmp_path, schema, compression="zstd") as writer:
            for split in (*stages.CACHED_SPLITS, *(("sample",) if cfg.activations.sample_tokens else ())):
                seq_ids, tokens = art.load_tokens(store, keys, (split if split != "sample" else "train",))
                if split == "sample":  # the train split's last sequences: the true sample's extra tokens
                    n_seq = min(len(tokens), cfg.activations.sample_tokens // max(tokens.shape[1], 1))
                    seq_ids, tokens = seq_ids[len(seq_ids) - n_seq:], tokens[len(tokens) - n_seq:]
                n_tokens[split] = tokens.size
                for batch in acts_lib.iter_latents(model, sae, layer, tokens, seq_ids, cfg.activations.batch_size,
                                                   device):
                    b = pa.Table.from_batches([batch]).append_column("split", pa.array([split] * batch.num_rows))
                    acts_lib.check_storable(b.column("act").to_numpy(), cfg.activations.dtype)
                    writer.write_table(b.cast(schema))
                    parts.append(b.select(["split", "latent", "act"]))
                    rows += batch.num_rows
        dt = time.perf_counter() - t0
        total_tokens = sum(n_tokens.values())
        log.info("activations: %d tokens, %d non-zero latents in %.1fs (%.0f tokens/s)", total_tokens, rows, dt,
                 total_tokens / max(dt, 1e-9))
        w.bytes("activations.parquet", tmp_path.read_bytes(), rows=rows)
    stats = acts_lib.latent_stats(pa.concat_tables(parts), n_tokens, sae.num_latents)
    w.table("latent_stats", stats)
    return w.finish(metrics={"rows": rows, "n_tokens": n_tokens, "tokens_per_s": total_tokens / max(dt, 1e-9),
                             "num_latents": sae.num_latents, "k": sae.cfg.k})
