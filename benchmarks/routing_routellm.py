"""RouteLLM's MMLU benchmark (GPT-4 vs Mixtral-8x7B): APGR and CPT next to the published routers.

Rows flagged as contaminated are dropped (as in the paper); a seeded random subset of
``--limit`` rows is used (0 = all). For each labelled fraction the router trains on that
share and is evaluated on the rest, beside the surface baselines fitted on the same share.
Features are extracted once (and cached), so each fraction costs only probe fits.

    python benchmarks/routing_routellm.py --limit 6000 --fractions 0.1 0.25 0.5
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import RESULTS, md_table, machine, num, pct, routellm_clean, write_results
from difficulty_router import ActivationExtractor, FeatureCache, ModelPool, cache_root, train_router
from difficulty_router.datasets import ROUTELLM_MMLU_POOL
from difficulty_router.evaluation import evaluate_proba, evaluate_router, plot_report

PUBLISHED = [  # RouteLLM paper, Table 2 (MMLU, GPT-4 vs Mixtral); trained on Arena data + MMLU-val golden labels
    ("published: random", 0.500, 0.5007, 0.7993),
    ("published: SW ranking (augmented), best", 0.603, 0.3540, 0.7155),
    ("published: causal LLM (augmented)", 0.600, 0.3549, 0.7031),
    ("published: matrix factorisation (augmented)", 0.597, 0.3546, 0.7140),
    ("published: BERT (augmented)", 0.572, 0.4130, 0.7220),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--layers", nargs="+", type=float, default=[0.4, 0.5])
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    outcomes, n_clean, n_contaminated = routellm_clean(args.limit, args.seed)
    pool = ModelPool.load(ROUTELLM_MMLU_POOL)
    outcomes = outcomes.select_models(pool.names)
    layers = [int(x) if float(x).is_integer() else x for x in args.layers]
    extractor = ActivationExtractor(args.extractor, max_tokens=args.max_tokens,
                                    feature_cache=FeatureCache(cache_root() / "features"))
    start = time.perf_counter()
    features = extractor.extract(outcomes.queries, layers=layers, pooling="both", progress=True)
    extract_s = time.perf_counter() - start

    rows, payload = [], {"machine": machine(), "extractor": extractor.model_id, "n_clean": n_clean, "n": len(outcomes),
                         "dropped_contaminated": n_contaminated, "seed": args.seed, "fractions": {}}
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(outcomes))
    last_report = None
    for fraction in args.fractions:
        cut = int(round(fraction * len(outcomes)))
        train_idx, test_idx = np.sort(order[:cut]), np.sort(order[cut:])
        train, test = outcomes.subset(train_idx), outcomes.subset(test_idx)
        t0 = time.perf_counter()
        router = train_router(train, pool, extractor, layers=layers, seed=args.seed, progress=False)
        train_s = time.perf_counter() - t0
        X = features.select(layers=router.layers, pooling=router.pooling).features
        proba = router.probe.predict_proba(X[test_idx])
        report = evaluate_router(router, test, train=train, seed=args.seed, proba=proba)
        threshold = evaluate_proba(proba, test, router.estimated_costs(test), router.capability, "threshold", args.seed)
        label = f"{int(round(fraction * 100))}% labels ({len(train)} train / {len(test)} test)"
        entries = [("router, utility rule P(s)-P(w) [default]", report), ("router, threshold rule 1-P(w)", threshold)]
        entries += [(f"baseline: {k}", v) for k, v in report["baselines"].items()]
        for name, rep in entries:
            rows.append([label, name, num(rep["apgr"]), pct(rep["cpt50"]), pct(rep["cpt80"]),
                         pct(rep["cost_to_match_best"])])
        payload["fractions"][str(fraction)] = {
            "n_train": len(train), "n_test": len(test), "train_seconds": train_s,
            "readout": router.info["readout"], "cv_auroc": router.info["cv_auroc"],
            "utility": {k: report[k] for k in ("apgr", "cpt50", "cpt80", "auc", "cost_to_match_best")},
            "threshold": {k: threshold[k] for k in ("apgr", "cpt50", "cpt80", "auc", "cost_to_match_best")},
            "baselines": {k: {m: v[m] for m in ("apgr", "cpt50", "cpt80", "auc")} for k, v in report["baselines"].items()},
        }
        print(f"{label}: utility APGR {report['apgr']:.3f}, CPT50 {pct(report['cpt50'])}; "
              f"threshold APGR {threshold['apgr']:.3f}; tfidf {report['baselines']['tfidf']['apgr']:.3f}", flush=True)
        last_report = report
    for name, apgr, c50, c80 in PUBLISHED:
        rows.append(["all of MMLU (paper)", name, num(apgr), pct(c50), pct(c80), "-"])
    # one name for a run's table, JSON and plot; subsets other than the default 6,000 rows carry their size
    result_name = f"routellm_mmlu_{extractor.model_id}" + ("" if args.limit == 6000 else f"_{args.limit}")
    plot_report(last_report, RESULTS / f"{result_name}.png",
                title=f"RouteLLM MMLU, {args.extractor}, {payload['fractions'][str(args.fractions[-1])]['n_test']} held-out rows")
    md = (f"RouteLLM MMLU (GPT-4 vs Mixtral-8x7B), {len(outcomes)} of {n_clean} clean rows (seed {args.seed}), "
          f"extractor {extractor.model_id}, candidate layers {list(features.layers)}, max {args.max_tokens} tokens; "
          f"extraction {extract_s:.0f} s on {machine()}.\n\n"
          + md_table(["labelled share", "predictor", "APGR", "CPT(50%)", "CPT(80%)", "cost to match GPT-4"], rows))
    write_results(result_name, md, payload)


if __name__ == "__main__":
    main()
