"""RouteLLM's MMLU benchmark (GPT-4 vs Mixtral-8x7B): learning curves with 95% intervals over random splits.

Rows flagged as contaminated are dropped (as in the paper) and a seeded subset of
``--limit`` rows is used. Each of ``--splits`` random splits holds out half the rows as the
test set; training sets of each size in ``--labels`` are nested prefixes of the other half.
Every predictor sees the same rows in every split:

- the router, trained exactly as ``difficulty-router train`` trains it (read-out sweep over
  the candidate layers, activation / lexical / stacked family chosen by cross-validation);
- its activation probe alone (the read-out the router chose), for the ablation;
- baselines tuned with the same care: TF-IDF (analyzer, n-gram range and C by CV), a kNN
  vote over the same activations (k by CV), prompt length; random and the oracle for scale.

Intervals are mean +- t(0.975, splits-1) x standard error over the splits; the router's
margin over the best baseline is a paired difference on the same splits.

    python benchmarks/routing_routellm.py --limit 6000 --splits 5 --labels 50 150 300 600 1500 3000

That published setting writes ``results/routellm_mmlu_<extractor>.*``; any other setting writes a name
that spells what differs (e.g. ``routellm_mmlu_smollm2-135m_limit1500``), so a smaller or quicker run
never overwrites the published files, nor the ``routellm_mmlu_<extractor>_1500.*`` files an earlier,
single-split version of this script wrote.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import RESULTS, extract_cached, machine, md_table, num, pct, routellm_clean, write_results
from scipy import stats
from tqdm.auto import tqdm

from difficulty_router import ModelPool, train_router
from difficulty_router.core.metrics import apgr_cpt
from difficulty_router.data.queries import conversation_text
from difficulty_router.datasets import ROUTELLM_MMLU_POOL
from difficulty_router.evaluation.baselines import baseline_proba, knn_proba

PUBLISHED = [  # RouteLLM paper, Table 2 (MMLU, GPT-4 vs Mixtral); trained on Arena data + MMLU-val golden labels
    ("published: random", 0.500, 0.5007, 0.7993),
    ("published: SW ranking (augmented), best", 0.603, 0.3540, 0.7155),
    ("published: causal LLM (augmented)", 0.600, 0.3549, 0.7031),
    ("published: matrix factorisation (augmented)", 0.597, 0.3546, 0.7140),
    ("published: BERT (augmented)", 0.572, 0.4130, 0.7220),
]
PREDICTORS = ("router", "activation probe only", "tfidf (tuned)", "knn (tuned)", "length", "random", "oracle")
BASELINE_NAMES = ("tfidf (tuned)", "knn (tuned)", "length")
#: the setting of the published table (docs/results/routellm.md); its results carry no suffix
PUBLISHED_SETTING = {"limit": 6000, "splits": 5, "labels": [50, 150, 300, 600, 1500, 3000],
                     "layers": [0.3, 0.4, 0.5, 0.6], "max_tokens": 512, "seed": 0}


def results_name(extractor_id: str, args: argparse.Namespace) -> str:
    """``routellm_mmlu_<extractor>`` for the published setting, else with a suffix naming what differs."""
    if args.name:
        return args.name
    differs = []
    for key, published in PUBLISHED_SETTING.items():
        value = getattr(args, key)
        if value != published:
            shown = "-".join(f"{x:g}" for x in value) if isinstance(value, list) else f"{value:g}"
            differs.append(f"{key.replace('_', '-')}{shown}")
    return "_".join([f"routellm_mmlu_{extractor_id}", *differs])


def interval(values) -> tuple[float, float, float]:
    """Mean and the 95% t-interval half-width over splits."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def fmt(values) -> str:
    mean, lo, hi = interval(values)
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--labels", type=int, nargs="+", default=[50, 150, 300, 600, 1500, 3000])
    parser.add_argument("--layers", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6],
                        help="candidate read-out layers the router sweeps (indexes or depth fractions)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--name", default=None,
                        help="results file name (default: routellm_mmlu_<extractor> for the published setting, "
                             "with a suffix naming every setting that differs from it otherwise)")
    args = parser.parse_args()

    outcomes, n_clean, n_contaminated = routellm_clean(args.limit, args.seed)
    pool = ModelPool.load(ROUTELLM_MMLU_POOL)
    outcomes = outcomes.select_models(pool.names)
    weak, strong = np.argsort(outcomes.scores.mean(axis=0))
    extractor, features, extract_s = extract_cached(args.extractor, args.max_tokens, outcomes.queries, args.layers,
                                                    args.progress)
    layers = list(features.layers)
    texts = [conversation_text(c) for c in outcomes.queries]
    half = len(outcomes) // 2
    labels = [n for n in args.labels if n <= half]

    results = {n: {p: {"apgr": [], "cpt50": [], "cpt80": []} for p in PREDICTORS} for n in labels}
    chosen = {n: [] for n in labels}
    train_seconds = {n: [] for n in labels}
    example_curves = {}
    jobs = [(s, n) for s in range(args.splits) for n in labels]
    for s, n in tqdm(jobs, desc="splits x label counts", disable=not args.progress):
        order = np.random.default_rng(args.seed + 1 + s).permutation(len(outcomes))
        test_idx, train_idx = np.sort(order[half:]), np.sort(order[:n])
        train, test = outcomes.subset(train_idx), outcomes.subset(test_idx)
        t0 = time.perf_counter()
        router = train_router(train, pool, extractor, layers=layers, seed=args.seed, progress=False)
        train_seconds[n].append(time.perf_counter() - t0)
        chosen[n].append(f"{router.family}, L{'+'.join(map(str, router.layers))} {'+'.join(router.pooling)}")
        X = features.select(layers=router.layers, pooling=router.pooling).features
        test_texts = [texts[i] for i in test_idx]
        lexical = router.family_fit_.lexical  # the tuned TF-IDF baseline: same CV over analyzer, n-grams and C
        proba = {
            "router": router.proba_from(test.queries, X[test_idx]),
            "activation probe only": router.probe.predict_proba(X[test_idx]),
            "tfidf (tuned)": lexical.predict_proba(test_texts),
            "knn (tuned)": knn_proba(X[train_idx], train.scores, X[test_idx], seed=args.seed)[0],
            "length": baseline_proba("length", test, train=train),
            "random": baseline_proba("random", test, seed=args.seed + s),
            "oracle": baseline_proba("oracle", test),
        }
        for name, p in proba.items():
            m = apgr_cpt(p[:, strong] - p[:, weak], test.scores[:, weak], test.scores[:, strong], args.seed)
            for key in ("apgr", "cpt50", "cpt80"):
                results[n][name][key].append(m[key] if m[key] is not None else 1.0)
            if s == 0 and n == labels[-1]:
                example_curves[name] = m["pgr_curve"]

    rows, summary = [], {}
    for n in labels:
        best = max(BASELINE_NAMES, key=lambda b: np.mean(results[n][b]["apgr"]))
        diff = np.array(results[n]["router"]["apgr"]) - np.array(results[n][best]["apgr"])
        summary[n] = {"best_baseline": best, "margin": interval(diff), "chosen": chosen[n],
                      "train_seconds": float(np.mean(train_seconds[n])),
                      **{p: {k: interval(v) for k, v in results[n][p].items()} for p in PREDICTORS}}
        for p in PREDICTORS:
            r = results[n][p]
            rows.append([n, p, fmt(r["apgr"]), pct(np.mean(r["cpt50"])), pct(np.mean(r["cpt80"]))])
        mean, lo, hi = summary[n]["margin"]
        rows.append([n, f"**router - {best}** (paired)", f"**{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]**", "", ""])
    for name, apgr, c50, c80 in PUBLISHED:
        rows.append(["all of MMLU (paper)", name, num(apgr), pct(c50), pct(c80)])
    chosen_rows = [[n, "; ".join(f"{c} x{chosen[n].count(c)}" for c in sorted(set(chosen[n]))),
                    f"{summary[n]['train_seconds']:.0f} s"] for n in labels]

    name = results_name(extractor.model_id, args)
    plot(results, labels, example_curves, RESULTS / f"{name}.png", extractor.model_id, len(test_idx), args.splits)
    md = (f"RouteLLM MMLU (GPT-4 vs Mixtral-8x7B), {len(outcomes)} of {n_clean} clean rows (seed {args.seed}); "
          f"{args.splits} random splits, each testing on the same {len(outcomes) - half} held-out rows for every "
          f"predictor and training on nested prefixes of the other half. Extractor {extractor.model_id}, candidate "
          f"layers {list(features.layers)}, max {args.max_tokens} tokens; extraction {extract_s:.0f} s "
          f"(0 when cached) on {machine()}.\n\n"
          f"APGR is the mean over splits with its 95% t-interval; CPT is the mean over splits.\n\n"
          + md_table(["labels", "predictor", "APGR [95% CI]", "CPT(50%)", "CPT(80%)"], rows)
          + "\n\nWhat the router chose (family, read-out), per label count, and its mean training time:\n\n"
          + md_table(["labels", "chosen in the splits", "train time"], chosen_rows) + "\n")
    payload = {"machine": machine(), "extractor": extractor.model_id, "n": len(outcomes), "n_clean": n_clean,
               "dropped_contaminated": n_contaminated, "splits": args.splits, "seed": args.seed,
               "results": {str(n): results[n] for n in labels},
               "summary": {str(n): summary[n] for n in labels}, "chosen": {str(n): chosen[n] for n in labels}}
    write_results(name, md, payload)


def plot(results, labels, curves, path, extractor_id, n_test, splits) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    for name in PREDICTORS[:5]:
        stats_ = [interval(results[n][name]["apgr"]) for n in labels]
        mean = [m for m, _, _ in stats_]
        left.plot(labels, mean, marker="o", lw=2.4 if name == "router" else 1.2, label=name)
        left.fill_between(labels, [lo for _, lo, _ in stats_], [hi for _, _, hi in stats_], alpha=0.15)
    left.axhline(0.5, color="grey", lw=0.8, ls=":", label="random")
    left.axhline(0.603, color="black", lw=0.8, ls="--", label="best published (RouteLLM, 0.603)")
    left.set_xscale("log")
    left.set_xlabel("labelled training rows")
    left.set_ylabel("APGR (held-out)")
    left.set_title(f"learning curves, mean and 95% CI over {splits} splits")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    for name in PREDICTORS[:5]:
        frac, pgr = zip(*curves[name])
        right.plot(frac, pgr, lw=2.4 if name == "router" else 1.1, label=name)
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.set_xlim(0, 1)
    right.set_xlabel("share of calls to GPT-4")
    right.set_ylabel("PGR")
    right.set_title(f"performance gap recovered, {labels[-1]} labels, split 0 ({n_test} test rows)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(f"RouteLLM MMLU (GPT-4 vs Mixtral), extractor {extractor_id}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
