"""Several layers rewritten at once (the paper's open question 3).

`multilayer.layers` names further layers besides `transcoder.layer`. Each layer gets its own
transcoder (the same transcoder settings, another layer) and, with `multilayer.simulate`, its own
activations / explain / score / simulate / calibrate stages. These are the ordinary stages run on
`layer_config(cfg, layer)`: content-addressed like any other, so a layer's artifacts are shared
with a single-layer run of that layer and never recomputed. The `multilayer` stage then rewrites
the first n layers of [transcoder.layer, *multilayer.layers] simultaneously (n = 1..N, nested
`replace_mlp` hooks, one per layer) and measures next-token CE of: every n MLP replaced by its
transcoder; every n zero-ablated (b_dec + skip); every n MLP zeroed; and every n layer's latents
simulated (each calibration method x fraction, top selection per layer by that layer's detection
score). Each row's paired difference is against the zero-ablation of the same n layers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import artifacts as art, evaluate as eval_lib, stages, subject as subject_lib, transcoder as tc_lib
from ..config import RewriteConfig
from ..manifest import ArtifactRef
from ..storage import Store
from ..subject import MlpFn

log = logging.getLogger("nlrewrite")

MULTILAYER_SCHEMA = pa.schema([("n_layers", pa.int32()), ("layers", pa.string()), *eval_lib.CE_SCHEMA])
"""The `multilayer` table: a `ce` row (condition, ..., delta_zero_*) for each number of layers
rewritten at once; `layers` lists them (comma-separated, in rewrite order)."""


def layer_order(cfg: RewriteConfig) -> list[int]:
    """The layers in the order they are added: transcoder.layer, then multilayer.layers as given."""
    return [cfg.transcoder.layer, *cfg.multilayer.layers]


def layer_config(cfg: RewriteConfig, layer: int) -> RewriteConfig:
    """The run's config with transcoder.layer = `layer` and no multilayer section: its stages are the
    single-layer pipeline of that layer (its plan() gives their keys)."""
    d = cfg.model_dump(mode="json")
    d["transcoder"]["layer"] = layer
    d.pop("multilayer", None)
    return RewriteConfig.model_validate(d)


def layer_keys(cfg: RewriteConfig) -> dict[int, dict[str, str]]:
    """Stage keys of every layer's single-layer pipeline (the main layer's are the run's own)."""
    return {layer: stages.plan(layer_config(cfg, layer)) for layer in layer_order(cfg)}


LAYER_STAGES = ["transcoder", "activations", "explain", "embed", "score", "simulate", "calibrate"]
"""The stages each extra layer runs on its own config (with multilayer.simulate; else the transcoder
only): the rest (corpus, subject) is the run's."""


def ensure_layer_pipeline(store: Store, cfg: RewriteConfig, keys: dict[str, str], simulate: bool) -> None:
    """Run (or find, by manifest) one layer's transcoder and, with `simulate`, its stages up to calibrate.
    The flow runs these as Prefect tasks first; this makes the library stage complete on its own."""
    stages.run_all(store, cfg, keys, until="calibrate" if simulate else "transcoder",
                   only=LAYER_STAGES if simulate else ["transcoder"])


def _layer_predictions(store: Store, keys: dict[str, str], methods: list[str], cids: np.ndarray,
                       num_latents: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(live latents, detection scores [num_latents], dense calibrated eval predictions per method)."""
    cidx = art.context_index(cids)
    cal = art.read_table(store, "calibrate", keys["calibrate"], "calibrated")
    preds = {}
    for method in methods:
        t = cal.filter(pc.field("calibration") == method)
        preds[method] = art.dense(t.column("context_id").to_numpy(), t.column("latent").to_numpy(),
                                     t.column("pred").to_numpy(), cidx, (len(cids), num_latents), fill=np.nan)
    sc = art.read_table(store, "score", keys["score"], "scores")
    scores = np.full(num_latents, np.nan)
    scores[sc.column("latent").to_numpy()] = sc.column("score").to_numpy(zero_copy_only=False).astype(float)
    live = np.unique(art.read_table(store, "calibrate", keys["calibrate"], "calibration", columns=["latent"])
                     .column("latent").to_numpy())
    return live, scores, preds


def evaluate_layers(store: Store, cfg: RewriteConfig, keys: dict[str, str]) -> ArtifactRef:
    """CE with 1..N layers rewritten at once, each against the zero-ablation of the same layers."""
    if ref := stages.reuse(store, "multilayer", keys):
        return ref
    if not cfg.multilayer.layers:
        raise ValueError("multilayer: no multilayer.layers configured")
    w = stages.writer(store, "multilayer", cfg, keys)
    ml, ev = cfg.multilayer, cfg.evaluate
    order = layer_order(cfg)
    per_layer = layer_keys(cfg)
    t0 = time.perf_counter()
    for layer in order:
        ensure_layer_pipeline(store, layer_config(cfg, layer), per_layer[layer], ml.simulate)
    t_pipelines = time.perf_counter() - t0

    device = art.device(cfg)
    model = art.load_subject(store, keys, device)
    seq_len, bs = cfg.corpus.seq_len, ev.batch_size
    seq_ids, tokens = art.load_tokens(store, keys, ("eval",))
    cids = art.context_ids(seq_ids, seq_len)
    saes = {layer: art.load_sae(store, per_layer[layer], device) for layer in order}
    sims = {layer: _layer_predictions(store, per_layer[layer], list(ml.calibrations), cids, saes[layer].num_latents)
            for layer in order} if ml.simulate else {}
    positions = [ev.positions] + [p for p in eval_lib.POSITIONS if p != ev.positions]

    def ce_of(makers: list[tuple[int, Any]]) -> dict[str, np.ndarray]:
        ce = eval_lib.ce_with_layers(model, tokens, bs, makers)
        return {p: eval_lib.per_sequence(ce, p) for p in positions}

    def fixed(fn: MlpFn) -> Callable[[slice], MlpFn]:
        return lambda rows: fn

    t1 = time.perf_counter()
    clean = ce_of([])
    rows: list[dict[str, Any]] = []
    n_runs = 1
    for n in range(1, len(order) + 1):
        layers = order[:n]
        tag = {"n_layers": n, "layers": ",".join(map(str, layers))}
        zero = ce_of([(lay, fixed(tc_lib.skip_fn(saes[lay]))) for lay in layers])
        conds: list[tuple[str, dict[str, np.ndarray], dict[str, Any]]] = [
            ("clean", clean, {}),
            ("transcoder", ce_of([(lay, fixed(eval_lib.flat(functools.partial(eval_lib.patched_output, saes[lay]))))
                                for lay in layers]), {}),
            ("zero_ablation", zero, {}),
            ("mlp_ablation", ce_of([(lay, fixed(subject_lib.zero_mlp)) for lay in layers]), {}),
        ]
        n_runs += 3
        for method in (ml.calibrations if ml.simulate else []):
            for frac in ml.fractions:
                makers, n_lat = [], 0
                for lay in layers:
                    live, scores, preds = sims[lay]
                    sel = eval_lib.select_latents(live, scores[live], frac, "top", -1)
                    # The evaluate stage's patch path: a failed prediction is patched as 0, from evaluate.patch_base.
                    makers.append((lay, eval_lib.patch_rows(saes[lay], np.nan_to_num(preds[method][:, sel], nan=0.0),
                                                            sel, seq_len, f"layer {lay} {method} predictions",
                                                            ev.patch_base)))
                    n_lat += len(sel)
                conds.append(("simulated", ce_of(makers), {"selection": "top", "fraction": frac,
                                                         "calibration": method, "n_latents": n_lat}))
                n_runs += 1
        for cond, ce, kw in conds:
            for p in positions:
                rows.append({**tag, **eval_lib.ce_row(cond, ce[p], zero[p], ev.n_bootstrap, positions=p, **kw)})
    t_eval = time.perf_counter() - t1
    log.info("multilayer: layers %s, %d CE runs in %.1fs (layer pipelines %.1fs)", order, n_runs, t_eval, t_pipelines)
    w.table("multilayer", pa.Table.from_pylist(rows, schema=MULTILAYER_SCHEMA))
    fits = {}
    for layer in order:
        m = store.read_manifest("transcoder", per_layer[layer]["transcoder"])["metrics"]
        fits[str(layer)] = {k: m.get(k) for k in ("eval_fvu", "eval_dead_fraction", "ce_transcoder",
                                                   "ce_zero_ablation", "ce_recovered")}
    return w.finish(metrics={
        "layers": order, "n_ce_runs": n_runs, "positions": ev.positions, "n_sequences": int(len(seq_ids)),
        "simulated": ml.simulate, "transcoder_fit": fits,
        "layer_keys": {str(layer): {s: per_layer[layer][s] for s in
                                    (("transcoder", "score", "calibrate") if ml.simulate else ("transcoder",))}
                       for layer in order},
        "n_live_latents": {str(layer): int(len(sims[layer][0])) for layer in sims},
        "seconds": {"layer_pipelines": round(t_pipelines, 1), "evaluate": round(t_eval, 1)}})
