"""Does the int8 extractor route as well as float32? RouteLLM MMLU, paired over random splits.

The int8 path (dynamic quantisation of the decoder blocks' linear layers) is only worth its speed if
routing quality holds. Same rows and splits as ``routing_routellm.py`` (contaminated rows dropped,
seeded subset, half held out per split); the activation probe at one read-out is trained and tested on:

- float32 features (the reference),
- int8 features (a router trained and served on an int8 machine),
- float32-trained, int8-served (a router trained elsewhere, served on an int8 machine).

APGR means with 95% t-intervals over splits, and paired differences against float32. The quality
check passes when the mean APGR of both int8 conditions lies inside float32's interval. Passing is
necessary for a model to be listed in ``numerics.INT8_ACCEPTED`` (the models ``dtype="auto"`` gives
int8), not sufficient: speed (``overhead.py``), memory and a full test run on the int8 path decide
too (see the comment there). The results say both: whether the check passed and whether the model is
in that list. Features go through the shared feature cache; int8 rows have their own cache key.

    python benchmarks/int8_quality.py --limit 3000 --splits 5 --train 1500 --layer 15
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import machine, md_table, routellm_clean, write_results
from routing_routellm import fmt, interval

from difficulty_router import ActivationExtractor, FeatureCache, ModelPool, cache_root
from difficulty_router.core.metrics import apgr_cpt
from difficulty_router.datasets import ROUTELLM_MMLU_POOL
from difficulty_router.extraction.numerics import INT8_ACCEPTED, INT8_SCHEME
from difficulty_router.learning.probes import SuccessProbe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--pooling", default="last")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cached-int8", default=None,
                        help="read int8 rows from the feature cache under this key suffix (e.g. 'int8', the first "
                             "scheme's) instead of extracting them with the current scheme")
    parser.add_argument("--cached-int8-scheme", default="dyn-perchannel-all-linears",
                        help="what to call the scheme of --cached-int8 rows in the results")
    args = parser.parse_args()

    outcomes, _, _ = routellm_clean(args.limit, args.seed)
    pool = ModelPool.load(ROUTELLM_MMLU_POOL)
    outcomes = outcomes.select_models(pool.names)
    weak, strong = np.argsort(outcomes.scores.mean(axis=0))
    cache = FeatureCache(cache_root() / "features")
    fp32 = ActivationExtractor(args.extractor, dtype="float32", max_tokens=args.max_tokens, feature_cache=cache)
    features = {"float32": fp32.extract(outcomes.queries, layers=[args.layer], pooling=args.pooling).features}
    if args.cached_int8:  # rows an earlier int8 scheme left in the cache, read as they are
        ids, _ = fp32.tokenize(outcomes.queries)
        key = f"{fp32.model_hash}|{args.cached_int8}"
        rows = [cache.load(key, (args.layer,), (args.pooling,), x, fp32.hidden_size) for x in ids]
        if any(r is None for r in rows):
            raise SystemExit(f"{sum(r is None for r in rows)} rows are not cached under {key!r}")
        features["int8"] = np.vstack(rows)
    else:
        int8 = ActivationExtractor(args.extractor, dtype="int8", max_tokens=args.max_tokens, feature_cache=cache)
        features["int8"] = int8.extract(outcomes.queries, layers=[args.layer], pooling=args.pooling).features
    scheme = args.cached_int8_scheme if args.cached_int8 else INT8_SCHEME
    half = len(outcomes) // 2
    n_train = min(args.train, half)
    conditions = {"float32": ("float32", "float32"), "int8": ("int8", "int8"),
                  "float32-trained, int8-served": ("float32", "int8")}
    apgr = {name: [] for name in conditions}
    for s in range(args.splits):
        order = np.random.default_rng(args.seed + 1 + s).permutation(len(outcomes))
        test_idx, train_idx = np.sort(order[half:]), np.sort(order[:n_train])
        Y = outcomes.scores
        probes = {d: SuccessProbe(seed=args.seed).fit(features[d][train_idx], Y[train_idx]) for d in features}
        for name, (train_dtype, test_dtype) in conditions.items():
            p = probes[train_dtype].predict_proba(features[test_dtype][test_idx])
            apgr[name].append(apgr_cpt(p[:, strong] - p[:, weak], Y[test_idx, weak], Y[test_idx, strong],
                                       args.seed)["apgr"])
    _, ref_lo, ref_hi = interval(apgr["float32"])
    rows, summary = [], {}
    for name in conditions:
        diff = np.array(apgr[name]) - np.array(apgr["float32"])
        mean = interval(apgr[name])[0]
        inside = bool(ref_lo <= mean <= ref_hi)
        d = interval(diff)
        summary[name] = {"apgr": interval(apgr[name]), "paired_diff_vs_float32": d, "inside_float32_interval": inside}
        rows.append([name, fmt(apgr[name]), "-" if name == "float32" else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]",
                     "-" if name == "float32" else ("yes" if inside else "no")])
    passed = summary["int8"]["inside_float32_interval"] and summary["float32-trained, int8-served"]["inside_float32_interval"]
    enabled = args.extractor in INT8_ACCEPTED
    md = (f"int8 vs float32 routing quality, RouteLLM MMLU (GPT-4 vs Mixtral-8x7B), {len(outcomes)} clean rows "
          f"(seed {args.seed}), {args.splits} random splits, {n_train} training rows, {len(outcomes) - half} test rows "
          f"per split; activation probe at layer {args.layer} ({args.pooling}), extractor {args.extractor}, "
          f"max {args.max_tokens} tokens, int8 scheme `{scheme}`, on {machine()}.\n\n"
          + md_table(["features", "APGR [95% CI]", "paired diff vs float32 [95% CI]", "mean inside float32's CI"], rows)
          + "\n\nQuality check (the mean APGR of int8 and of float32-trained, int8-served both inside float32's 95% "
          f"interval): **{'passed' if passed else 'failed'}**.\n\n"
          f"Enabled by `dtype=\"auto\"`: **{'yes' if enabled else 'no'}** ({args.extractor} is "
          f"{'' if enabled else 'not '}in `numerics.INT8_ACCEPTED`). Passing the quality check is necessary for "
          "that list, not sufficient: see the comment at `INT8_ACCEPTED` for what else decides.\n")
    payload = {"machine": machine(), "extractor": args.extractor, "int8_scheme": scheme, "n": len(outcomes), "splits": args.splits,
               "train": n_train, "layer": args.layer, "pooling": args.pooling, "apgr": apgr, "summary": summary,
               "quality_check_passed": passed, "enabled_by_auto": enabled}
    write_results(f"int8_quality_{args.extractor}_{scheme}_{args.limit}", md, payload)


if __name__ == "__main__":
    main()
