"""Which probe variant ranks RouteLLM MMLU best? APGR of the utility rule on held-out rows, per variant.

Reads the features that routing_routellm.py cached (same rows, split and seed), so it runs
no forward pass of its own when that ran first.

    python benchmarks/routing_ablation.py --limit 6000 --fraction 0.5
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import machine, md_table, num, pct, routellm_clean, write_results

from difficulty_router import ActivationExtractor, FeatureCache, SuccessProbe, cache_root
from difficulty_router.core.metrics import apgr_cpt
from difficulty_router.data.queries import conversation_text
from difficulty_router.evaluation.baselines import baseline_proba

WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--extractor", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--layers", nargs="+", type=float, default=[0.4, 0.5])
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    outcomes = routellm_clean(args.limit, args.seed)[0].select_models([WEAK, STRONG])
    layers = [int(x) if float(x).is_integer() else x for x in args.layers]
    extractor = ActivationExtractor(args.extractor, max_tokens=args.max_tokens,
                                    feature_cache=FeatureCache(cache_root() / "features"))
    feats = extractor.extract(outcomes.queries, layers=layers, pooling="both", progress=True)
    order = np.random.default_rng(args.seed).permutation(len(outcomes))
    cut = int(round(args.fraction * len(outcomes)))
    tr, te = np.sort(order[:cut]), np.sort(order[cut:])
    Y = outcomes.scores
    w, s = Y[te, 0], Y[te, 1]
    length = np.log1p([len(conversation_text(q)) for q in outcomes.queries])[:, None]
    variants = {}
    for layer in feats.layers:
        for pool in ("last", "mean", ("last", "mean")):
            name = f"L{layer} {'+'.join(pool) if isinstance(pool, tuple) else pool}"
            variants[name] = feats.select(layers=[layer], pooling=pool).features
    variants["all layers, last+mean"] = feats.features
    variants["all layers, last+mean, + log length"] = np.hstack([feats.features, length])
    rows, payload = [], {"machine": machine(), "n_train": len(tr), "n_test": len(te), "variants": {}}
    for name, X in variants.items():
        for comps in (None, 128):
            probe = SuccessProbe(cv=5, n_components=comps, seed=args.seed).fit(X[tr], Y[tr])
            P = probe.predict_proba(X[te])
            util = apgr_cpt(P[:, 1] - P[:, 0], w, s, args.seed)
            thr = apgr_cpt(1 - P[:, 0], w, s, args.seed)
            label = name + ("" if comps is None else f", PCA {comps}")
            rows.append([label, num(probe.cv_auroc_[0]), num(probe.cv_auroc_[1]), num(util["apgr"]),
                         pct(util["cpt50"]), num(thr["apgr"])])
            payload["variants"][label] = {"cv_auroc": probe.cv_auroc_.tolist(), "utility": util | {"pgr_curve": None},
                                          "threshold_apgr": thr["apgr"]}
            print(rows[-1], flush=True)
    train, test = outcomes.subset(tr), outcomes.subset(te)
    # Stacking: a logistic regression per model on the out-of-fold logits of the activation probe and of TF-IDF.
    best = max((k for k in payload["variants"] if "PCA" not in k), key=lambda k: payload["variants"][k]["utility"]["apgr"])
    X = variants[best]
    probe = SuccessProbe(cv=5, seed=args.seed).fit(X[tr], Y[tr])
    act_tr, act_te = probe.oof_proba_, probe.predict_proba(X[te])
    tf_tr, tf_te = baseline_proba("tfidf", train, seed=args.seed), baseline_proba("tfidf", test, train=train)
    logit = lambda p: np.log(np.clip(p, 1e-4, 1 - 1e-4) / np.clip(1 - p, 1e-4, 1))
    from sklearn.linear_model import LogisticRegression
    P = np.column_stack([
        LogisticRegression().fit(np.column_stack([logit(act_tr[:, j]), logit(tf_tr[:, j])]), Y[tr, j])
        .predict_proba(np.column_stack([logit(act_te[:, j]), logit(tf_te[:, j])]))[:, 1] for j in range(2)])
    util = apgr_cpt(P[:, 1] - P[:, 0], w, s, args.seed)
    rows.append([f"stack: {best} + tfidf", "-", "-", num(util["apgr"]), pct(util["cpt50"]),
                 num(apgr_cpt(1 - P[:, 0], w, s, args.seed)["apgr"])])
    payload["variants"]["stack"] = {"base": best, "utility_apgr": util["apgr"], "cpt50": util["cpt50"]}
    for base in ("tfidf", "length"):
        P = baseline_proba(base, test, train=train)
        util = apgr_cpt(P[:, 1] - P[:, 0], w, s, args.seed)
        rows.append([f"baseline: {base}", "-", "-", num(util["apgr"]), pct(util["cpt50"]),
                     num(apgr_cpt(1 - P[:, 0], w, s, args.seed)["apgr"])])
    md = (f"Probe ablation on RouteLLM MMLU ({len(tr)} train / {len(te)} held-out of {len(outcomes)}, seed {args.seed}), "
          f"extractor {extractor.model_id}, on {machine()}.\n\n"
          + md_table(["features", "CV AUROC Mixtral", "CV AUROC GPT-4", "APGR utility", "CPT(50%) utility",
                      "APGR threshold"], rows))
    write_results(f"routing_ablation_{extractor.model_id}", md, payload)


if __name__ == "__main__":
    main()
