"""Zero-label routing: the shipped IRT difficulty head, trained without RouteLLM, tested on RouteLLM MMLU.

Training data (nothing from RouteLLM): a seeded 3,000-row subset of MMLU-Pro with all 29
models' correctness (the rows of ``routing_pools.py mmlu-pro --limit 3000``, so their
read-outs are in the feature cache) and LLMRouter's 2,000-row train subset plus its
500-row test file (the rows of ``routing_pools.py llmrouter --limit 2000``), with its 9
models' 0..1 scores. The head is one linear difficulty over the extractor's read-out shared
by a two-parameter IRT model per source (``difficulty_router.routing.pretrained.fit_irt``).

Selection without the test set: read-out (blocks of layers 12/15, last/mean pooling) and
L2 strength are chosen by the mean AUROC of difficulty against each training model's
failures on a seeded 20% of the training rows held out from the fit; the winner is refitted
on all training rows. The ablation table still shows every candidate on RouteLLM, and a
ridge head on the mean failure rate, so the choice can be checked, not re-made on the test.

Test: RouteLLM MMLU (GPT-4 vs Mixtral-8x7B), contaminated rows dropped, a seeded subset of
``--limit`` rows (default 6000, whose read-outs are cached; 0 = all 14,037). Queries go to
GPT-4 in order of predicted difficulty; APGR with a 95% bootstrap interval over test rows.

    python benchmarks/zero_label.py                 # evaluate the shipped head
    python benchmarks/zero_label.py --write-head     # refit and overwrite the shipped head
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import time

import numpy as np
import torch
from _common import extract_cached, machine, md_table, need_data, routellm_clean, write_results
from routing_pools import load as load_pool_rows
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score

from difficulty_router import DifficultyRouter, ModelPool
from difficulty_router.core.metrics import apgr_cpt
from difficulty_router.datasets import ROUTELLM_MMLU_POOL
from difficulty_router.routing.pretrained import (
    PRETRAINED_DIR,
    QUANTILE_LEVELS,
    DifficultyHead,
    fit_irt,
)

LAYERS = (12, 15)
BLOCKS = {"L12 last": 0, "L12 mean": 1, "L15 last": 2, "L15 mean": 3}  # order of extract(layers, pooling="both")
CANDIDATE_READOUTS = {"L15 last": ["L15 last"], "L15 mean": ["L15 mean"], "L15 last+mean": ["L15 last", "L15 mean"],
                      "L12+L15 last+mean": list(BLOCKS)}
CANDIDATE_L2 = (1.0, 3.0, 10.0)
PUBLISHED = [("random (published)", 0.500), ("RouteLLM best published (SW ranking, golden labels)", 0.603)]


def blocks(features: np.ndarray, names: list[str], hidden: int) -> np.ndarray:
    return np.concatenate([features[:, BLOCKS[n] * hidden:(BLOCKS[n] + 1) * hidden] for n in names], axis=1)


def mmlu_pro_all_models(ids) -> tuple[np.ndarray, list[str]]:
    """Every MMLU-Pro model's 0/1 outcome on the questions ``ids`` (NaN: no record), and the model names."""
    with gzip.open(need_data("mmlu_pro/correct.csv.gz"), "rt") as fh:
        reader = csv.reader(fh)
        models = next(reader)[1:]
        table = {row[0]: row[1:] for row in reader}
    return np.array([[np.nan if v == "" else float(v) for v in table[q]] for q in ids]), models


def training_sources(extractor_id: str, max_tokens: int, progress: bool):
    mmlu_pro, _, _ = load_pool_rows("mmlu-pro", 3000, 0)
    mp_y, models = mmlu_pro_all_models(mmlu_pro.ids)
    llmrouter, _, _ = load_pool_rows("llmrouter", 2000, 0)
    extractor, mp_x, _ = extract_cached(extractor_id, max_tokens, mmlu_pro.queries, list(LAYERS), progress)
    _, lr_x, _ = extract_cached(extractor_id, max_tokens, llmrouter.queries, list(LAYERS), progress)
    return extractor, [("MMLU-Pro", mp_x.features, mp_y, models), ("LLMRouter", lr_x.features, llmrouter.scores,
                                                                    list(llmrouter.models))]


def mean_auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Mean over models of AUROC(difficulty, the model fails)."""
    out = []
    for j in range(y.shape[1]):
        seen = ~np.isnan(y[:, j])
        fails = (y[seen, j] < 0.5).astype(int)
        if 0 < fails.mean() < 1:
            out.append(roc_auc_score(fails, score[seen]))
    return float(np.mean(out))


def bootstrap_apgr(score, weak, strong, resamples: np.ndarray) -> tuple[float, float, float]:
    point = apgr_cpt(score, weak, strong)["apgr"]
    draws = [apgr_cpt(score[r], weak[r], strong[r])["apgr"] for r in resamples]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--limit", type=int, default=6000, help="RouteLLM test rows (0 = all clean rows)")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--write-head", action="store_true", help="refit and overwrite the head shipped in the package")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the fits are small; one thread avoids spin contention on a shared box

    start = time.perf_counter()
    extractor, sources = training_sources(args.extractor, args.max_tokens, args.progress)
    hidden = extractor.hidden_size
    rng = np.random.default_rng(args.seed)
    held = [rng.random(len(x)) < 0.2 for _, x, _, _ in sources]

    # 1. selection on held-out training rows
    selection = []
    for readout, names in CANDIDATE_READOUTS.items():
        for l2 in CANDIDATE_L2:
            fit = fit_irt([(blocks(x, names, hidden)[~h], y[~h]) for (_, x, y, _), h in zip(sources, held)], l2=l2)
            scores = [((blocks(x, names, hidden)[h] - fit["mean"]) / fit["scale"]) @ fit["weight"]
                      for (_, x, _, _), h in zip(sources, held)]
            val = float(np.mean([mean_auroc(s, y[h]) for s, (_, _, y, _), h in zip(scores, sources, held)]))
            selection.append({"readout": readout, "l2": l2, "val_auroc": val})
            print(f"{readout:>20} l2={l2:<5} held-out training AUROC {val:.3f}", flush=True)
    best = max(selection, key=lambda r: r["val_auroc"])

    # 2. the test rows
    test, n_clean, n_contaminated = routellm_clean(args.limit, args.seed)
    test = test.select_models(ModelPool.load(ROUTELLM_MMLU_POOL).names)
    weak_j, strong_j = np.argsort(test.scores.mean(axis=0))
    weak, strong = test.scores[:, weak_j], test.scores[:, strong_j]
    _, test_x, _ = extract_cached(args.extractor, args.max_tokens, test.queries, list(LAYERS), args.progress)
    test_x = test_x.features
    resamples = np.random.default_rng(args.seed).integers(0, len(test), (args.bootstrap, len(test)))

    # 3. every candidate refitted on all training rows, scored on the test rows (ablation, not selection)
    ablation, fits = [], {}
    for row in selection:
        names = CANDIDATE_READOUTS[row["readout"]]
        fit = fit_irt([(blocks(x, names, hidden), y) for _, x, y, _ in sources], l2=row["l2"])
        fits[(row["readout"], row["l2"])] = fit
        score = ((blocks(test_x, names, hidden) - fit["mean"]) / fit["scale"]) @ fit["weight"]
        ablation.append([f"IRT, {row['readout']}, l2 {row['l2']:g}" + (" (selected)" if row is best else ""),
                         f"{row['val_auroc']:.3f}", f"{apgr_cpt(score, weak, strong)['apgr']:.3f}"])
    for names in (["L15 mean"], list(BLOCKS)):
        x_all = np.vstack([blocks(x, names, hidden) for _, x, _, _ in sources])
        target = np.concatenate([(lambda f: (f - f.mean()) / f.std())(1 - np.nanmean(y, axis=1)) for _, _, y, _ in sources])
        mu, sd = x_all.mean(0), x_all.std(0) + 1e-6
        ridge = Ridge(alpha=1000.0).fit((x_all - mu) / sd, target)
        score = ridge.predict((blocks(test_x, names, hidden) - mu) / sd)
        ablation.append([f"ridge on mean failure rate, {'+'.join(names)}, alpha 1000", "-",
                         f"{apgr_cpt(score, weak, strong)['apgr']:.3f}"])
    length = np.array([len(json.dumps(q)) for q in test.queries], dtype=np.float64)
    ablation.append(["prompt length (longer = harder)", "-", f"{apgr_cpt(length, weak, strong)['apgr']:.3f}"])

    # 4. the shipped head
    chosen = fits[(best["readout"], best["l2"])]
    names = CANDIDATE_READOUTS[best["readout"]]
    if args.write_head:
        pooling_of = {"last": "last", "mean": "mean"}
        layers = sorted({int(n.split()[0][1:]) for n in names})
        pooling = [p for p in ("last", "mean") if any(n.endswith(p) for n in names)]
        assert [f"L{l} {pooling_of[p]}" for l in layers for p in pooling] == names, "read-out blocks must be a grid"
        slopes = np.concatenate(chosen["slopes"])
        head = DifficultyHead(
            mean=chosen["mean"], scale=chosen["scale"], weight=chosen["weight"], bias=chosen["bias"],
            discrimination=float(np.median(slopes)),
            quantiles=np.quantile(chosen["train_difficulty"], QUANTILE_LEVELS),
            extractor={**extractor.describe(), "max_tokens": args.max_tokens}, layers=layers, pooling=pooling,
            info={"method": "2PL IRT, difficulty linear in the standardised read-out, L-BFGS, L2 on the weights",
                  "l2": best["l2"], "readout": best["readout"], "selection": "held-out training AUROC",
                  "sources": {name: {"rows": len(x), "models": models} for name, x, _, models in sources},
                  "excluded": "RouteLLM MMLU (the zero-label test set)",
                  "abilities": {name: dict(zip(models, np.round(a, 3).tolist()))
                                for (name, _, _, models), a in zip(sources, chosen["abilities"])}})
        head.save(PRETRAINED_DIR)
        print(f"wrote {PRETRAINED_DIR}")
    head = DifficultyHead.load()
    router = DifficultyRouter.pretrained([test.models[weak_j], test.models[strong_j]], head=head, extractor=extractor)
    # the shipped router's own order of queries: its difficulty read back from the probe it routes with
    from difficulty_router.routing.pretrained import ladder_difficulty

    shipped_score = ladder_difficulty(router, blocks(test_x, [f"L{l} {p}" for l in head.layers for p in head.pooling], hidden))
    shipped = bootstrap_apgr(shipped_score, weak, strong, resamples)
    metrics = apgr_cpt(shipped_score, weak, strong)
    # paired: the head minus prompt length on the same bootstrap resamples (is the read-out more than length?)
    diffs = [apgr_cpt(shipped_score[r], weak[r], strong[r])["apgr"] - apgr_cpt(length[r], weak[r], strong[r])["apgr"]
             for r in resamples]
    versus_length = (float(np.mean(diffs)), *np.percentile(diffs, [2.5, 97.5]).tolist())
    shares = np.mean([d.model == test.models[strong_j] for d in router.route_batch(test.queries[:200], progress=False)])

    seconds = time.perf_counter() - start
    rows = [["**shipped pretrained head (zero labels)**", f"**{shipped[0]:.3f} [{shipped[1]:.3f}, {shipped[2]:.3f}]**",
             f"{100 * metrics['cpt50']:.1f}%", f"{100 * metrics['cpt80']:.1f}%"]]
    rows += [["prompt length (longer = harder)", f"{apgr_cpt(length, weak, strong)['apgr']:.3f}", "", ""]]
    rows += [["shipped head minus prompt length (paired)",
              f"{versus_length[0]:+.3f} [{versus_length[1]:+.3f}, {versus_length[2]:+.3f}]", "", ""]]
    rows += [[name, f"{value:.3f}", "", ""] for name, value in PUBLISHED]
    md = (f"Zero-label routing on RouteLLM MMLU (GPT-4 vs Mixtral-8x7B): {len(test)} of {n_clean} clean rows "
          f"(seed {args.seed}, {n_contaminated} contaminated rows dropped), none of RouteLLM in training. "
          f"Extractor {extractor.model_id}, max {args.max_tokens} tokens; {seconds:.0f} s in all (read-outs from the "
          f"feature cache) on {machine()}.\n\n"
          f"Training: MMLU-Pro {len(sources[0][1])} rows x 29 models, LLMRouter {len(sources[1][1])} rows x 9 models "
          f"(see the script's docstring). Selected by held-out training AUROC: {best['readout']}, l2 {best['l2']:g}.\n\n"
          f"APGR with a 95% interval from {args.bootstrap} bootstrap resamples of the test rows; CPT is the share of "
          f"GPT-4 calls needed to recover 50%/80% of the gap.\n\n"
          + md_table(["router", "APGR [95% CI]", "CPT(50%)", "CPT(80%)"], rows)
          + f"\n\nWith the default even shares the shipped router sent {100 * shares:.0f}% of the first 200 test "
          f"queries to GPT-4.\n\nAblation (every candidate refitted on all training rows; the selection used only the "
          f"held-out training AUROC column, the RouteLLM column is for reading, not choosing):\n\n"
          + md_table(["difficulty head", "held-out training AUROC", "RouteLLM APGR"], ablation) + "\n")
    write_results("zero_label", md, {"machine": machine(), "n_test": len(test), "selection": selection,
                                     "selected": best, "shipped_apgr": shipped, "versus_length": versus_length, "cpt50": metrics["cpt50"],
                                     "cpt80": metrics["cpt80"], "ablation": ablation, "seconds": seconds,
                                     "pgr_curve": metrics["pgr_curve"]})


if __name__ == "__main__":
    main()
