"""A real cascade on this machine: SmolLM2-135M -> Qwen2.5-Coder-0.5B -> Qwen2.5-Coder-1.5B on MMLU-Pro.

Every model really answers every question (greedy, letter only, graded against the gold
letter); the cascade, the pre-generation router and the hybrid are then replayed on those
logged answers and signals, which is exactly what they would have done live, since a
rung's answer does not depend on whether it is later accepted.

- P(T): from the answer's token log-probabilities (``first``, ``mean``, ``min`` and the
  letter token itself; the reduction used is chosen on the calibration half by AUROC).
- P(IK): a probe on each rung's own prefill hidden state (middle layer, end of prompt),
  taken from the same forward pass that generated the answer; out-of-fold (5 folds).
- Pre-generation router: per-rung success probes on SmolLM2 layer-15 read-out (the same
  prefill of the first rung), out-of-fold; threshold policy.
- Compute: FLOPs = 2 x non-embedding params x (prompt + generated tokens) of every attempt,
  plus the router's read-out (half of SmolLM2's layers over the prompt) where it is used.
- Thresholds are calibrated on one half of the questions ("within 1 point of the 1.5B
  model's accuracy") and reported on the other half.

Usage: ``python benchmarks/fetch_models.py qwen2.5-coder-0.5b qwen2.5-coder-1.5b`` then
``python benchmarks/cascade_ladder.py --n 200 --max-chars 800 --options 4`` (the run on docs/results/cascade-ladder.md). Answers are cached per model under
``~/.cache/difficulty-router/cascade`` so the analysis can be rerun without regenerating.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import sys
import time

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import machine, need_data, write_results

from difficulty_router import ActivationExtractor, SuccessProbe, cache_root
from difficulty_router.calling.cascade_policy import CascadePolicy, simulate
from difficulty_router.calling.generation import LocalGenerator
from difficulty_router.core.metrics import frontier
from difficulty_router.extraction.model_store import resolve

LADDER = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
LETTERS = "ABCDEFGHIJ"
REDUCTION_NAMES = {"pt_first": "first token", "pt_mean": "mean", "pt_min": "min", "pt_letter": "answer span"}
ROUTER_LAYER = 15  # SmolLM2 read-out of the pre-generation router (as in the other benchmarks)


def load_questions(n: int, seed: int, max_chars: int, options: int = 0) -> list[dict]:
    with gzip.open(need_data("mmlu_pro/questions.jsonl.gz"), "rt") as fh:
        rows = [json.loads(line) for line in fh]
    if options:
        rows = [fewer_options(r, options, seed) for r in rows if len(r["options"]) >= options]
    rows = [r for r in rows if len(render(r)) <= max_chars]
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    return [rows[i] for i in pick]


def fewer_options(row: dict, options: int, seed: int) -> dict:
    """The gold option plus ``options - 1`` distractors, in a seeded random order: an MMLU-like
    variant (chance 1/options) on which small models are right often enough for a cascade to matter."""
    rng = np.random.default_rng([seed, int(hashlib.sha256(row["question_id"].encode()).hexdigest()[:8], 16)])
    gold = LETTERS.index(row["answer"])
    others = [i for i in range(len(row["options"])) if i != gold]
    keep = [gold] + [others[i] for i in rng.choice(len(others), options - 1, replace=False)]
    keep = [keep[i] for i in rng.permutation(options)]
    return {**row, "options": [row["options"][i] for i in keep], "answer": LETTERS[keep.index(gold)],
            "question_id": f"{row['question_id']}/{options}"}


# Without it the Qwen-Coder models open with reasoning ("To find the net cost of ...") and never
# reach a letter within a few tokens; with it every rung answers with the letter first.
SYSTEM = "You are an exam solver. Reply with exactly one capital letter (the correct option) and nothing else."


def conversation(row: dict) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": render(row)}]


def grade_row(row: dict, text: str, tokens: list[str], logprobs: list[float]) -> tuple[bool, float]:
    """Right or wrong, and the log-probability of the token carrying the answer letter."""
    letter, lp = grade(text, tokens, logprobs)
    return letter == row["answer"], lp


def render(row: dict) -> str:
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"]))
    return (f"Question: {row['question']}\nOptions:\n{options}\n"
            "Answer with the letter of the correct option only.")


def grade(text: str, tokens: list[str], logprobs: list[float]) -> tuple[str | None, float]:
    """The first standalone option letter in the reply, and the log-probability of the token carrying it."""
    match = re.search(r"\b([A-J])\b", text)
    if not match:
        return None, logprobs[0] if logprobs else -30.0
    letter = match.group(1)
    for tok, lp in zip(tokens, logprobs):
        if tok.strip().strip(".():").startswith(letter):
            return letter, lp
    return letter, logprobs[0] if logprobs else 0.0


def collect(model: str, questions: list[dict], max_new_tokens: int, backend: str = "transformers") -> dict:
    """Every question answered by one rung, cached per model and question set."""
    path = cache_root() / "cascade" / f"{model}-{len(questions)}-{hash_ids(questions)}.npz"
    if path.is_file():
        data = np.load(path, allow_pickle=False)
        return {k: data[k] for k in data.files}
    run = collect_llama_cpp if backend == "llama-cpp" else collect_transformers
    data = run(model, questions, max_new_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **data)
    return data


def collect_transformers(model: str, questions: list[dict], max_new_tokens: int) -> dict:
    extractor = ActivationExtractor(model, dtype="float32")
    layer = ROUTER_LAYER if model == LADDER[0] else extractor.n_layers // 2
    generator = LocalGenerator(extractor, name=model, max_new_tokens=max_new_tokens, readout=([layer], "last"))
    rows = {k: [] for k in ("correct", "pt_first", "pt_mean", "pt_min", "pt_letter", "prompt_tokens",
                            "completion_tokens", "features", "seconds")}
    for q in tqdm(questions, desc=model, unit="q"):
        start = time.perf_counter()
        out = generator.generate(conversation(q))
        rows["seconds"].append(time.perf_counter() - start)
        right, letter_lp = grade_row(q, out.text, out.tokens, out.logprobs)
        lps = out.logprobs or [-30.0]
        rows["correct"].append(float(right))
        rows["pt_first"].append(np.exp(lps[0]))
        rows["pt_mean"].append(np.exp(np.mean(lps)))
        rows["pt_min"].append(np.exp(np.min(lps)))
        rows["pt_letter"].append(np.exp(letter_lp))
        rows["prompt_tokens"].append(out.prompt_tokens)
        rows["completion_tokens"].append(out.completion_tokens)
        rows["features"].append(out.features)
    data = {k: np.asarray(v) for k, v in rows.items()}
    data["n_params"] = np.asarray(generator.n_params)
    data["readout_layer"] = np.asarray(layer)
    return data


def collect_llama_cpp(model: str, questions: list[dict], max_new_tokens: int) -> dict:
    """The top rung through llama.cpp on its quantized GGUF: 2 CPU cores cannot run 1.5B in fp32 torch
    for hundreds of questions in a session. The top rung is always accepted, so only its answer and
    token counts matter (no logprobs: llama.cpp would compute logits for every prompt token); greedy
    decoding with the GGUF's own chat template."""
    from llama_cpp import Llama

    source = resolve(model)
    llm = Llama(model_path=f"{source.path}/{source.gguf_file}", n_ctx=2048, n_threads=2, verbose=False)
    n_params = gguf_non_embedding_params(f"{source.path}/{source.gguf_file}")
    rows = {k: [] for k in ("correct", "pt_first", "pt_mean", "pt_min", "pt_letter", "prompt_tokens",
                            "completion_tokens", "seconds")}
    for q in tqdm(questions, desc=f"{model} (llama.cpp)", unit="q"):
        start = time.perf_counter()
        out = llm.create_chat_completion(conversation(q), max_tokens=max_new_tokens,
                                         temperature=0.0)
        rows["seconds"].append(time.perf_counter() - start)
        choice = out["choices"][0]
        text = choice["message"]["content"] or ""
        right, _ = grade_row(q, text, [], [])
        rows["correct"].append(float(right))
        for key in ("pt_first", "pt_mean", "pt_min", "pt_letter"):
            rows[key].append(1.0)  # never read: the top rung always accepts
        rows["prompt_tokens"].append(out["usage"]["prompt_tokens"])
        rows["completion_tokens"].append(out["usage"]["completion_tokens"])
    data = {k: np.asarray(v) for k, v in rows.items()}
    data["n_params"] = np.asarray(n_params)
    data["features"] = np.zeros((len(questions), 1), dtype=np.float32)  # no hidden states from this backend
    data["readout_layer"] = np.asarray(-1)
    return data


def gguf_non_embedding_params(path: str) -> int:
    """Parameters of a GGUF model without its embedding tables (as LocalGenerator.n_params counts them)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return int(sum(int(t.n_elements) for t in reader.tensors if t.name not in ("token_embd.weight", "output.weight")))


def hash_ids(questions) -> str:
    key = ",".join(q["question_id"] for q in questions) + "|" + SYSTEM
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def out_of_fold(features: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Probe predictions for each row from a probe that never saw it (5 folds)."""
    labels = labels.reshape(len(labels), -1)
    out = np.zeros(labels.shape)
    strat = labels[:, 0] if labels.shape[1] == 1 else labels.sum(axis=1)
    for train, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(features, strat):
        probe = SuccessProbe(cv=3).fit(features[train], labels[train])
        out[test] = probe.predict_proba(features[test])
    return out


def auroc(y, s) -> float:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-chars", type=int, default=1200, help="skip questions whose prompt is longer")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--options", type=int, default=0,
                        help="keep the gold and this many minus one distractors per question (0: all, up to 10)")
    parser.add_argument("--top-backend", choices=["llama-cpp", "transformers"], default="llama-cpp",
                        help="how the top rung (1.5B) runs; it needs no hidden states")
    args = parser.parse_args()

    questions = load_questions(args.n, args.seed, args.max_chars, args.options)
    task = "MMLU-Pro" + (f", {args.options} options" if args.options else "")
    fewer = f"{args.options} options each: the gold and {args.options - 1} seeded random distractors, " if args.options else ""
    description = f"MMLU-Pro, {args.n} questions ({fewer}prompts <= {args.max_chars} chars, seed {args.seed})"
    backends = ["transformers"] * (len(LADDER) - 1) + [args.top_backend]
    runs = [collect(m, questions, args.max_new_tokens, b) for m, b in zip(LADDER, backends)]
    n, k = len(questions), len(LADDER)
    correct = np.stack([r["correct"] for r in runs], axis=1)
    # one parameter count rule for every rung, whatever ran it: non-embedding weights of its GGUF
    params = [gguf_non_embedding_params(f"{resolve(m).path}/{resolve(m).gguf_file}") for m in LADDER]
    flops = np.stack([2 * p * (r["prompt_tokens"] + r["completion_tokens"]) for p, r in zip(params, runs)], 1) / 1e9
    router_flops = 2 * params[0] * ROUTER_LAYER / 30 * runs[0]["prompt_tokens"] / 1e9

    # the top rung always accepts, so its P(IK) is never read: only the lower rungs get probes
    pik = np.stack([out_of_fold(r["features"], r["correct"], args.seed)[:, 0] for r in runs[:-1]]
                   + [np.ones(len(questions))], axis=1)
    router_p = out_of_fold(runs[0]["features"], correct, args.seed)
    rng = np.random.default_rng(args.seed)
    calib = np.zeros(n, dtype=bool)
    calib[rng.permutation(n)[: n // 2]] = True
    test = ~calib

    # P(T) reduction: chosen on the calibration half by AUROC of the small model's correctness
    reductions = ["pt_first", "pt_mean", "pt_min", "pt_letter"]
    auc_small = {name: auroc(correct[calib, 0], runs[0][name][calib]) for name in reductions}
    best_reduce = max(reductions, key=lambda r: np.nan_to_num(auc_small[r]))
    pt = np.stack([r[best_reduce] for r in runs], axis=1)

    # AUROC of each signal for "this lower rung answers correctly", on the test half
    signal_auc = {
        LADDER[j]: {f"P(T) {REDUCTION_NAMES[r]}": auroc(correct[test, j], runs[j][r][test]) for r in reductions}
        | {"P(IK)": auroc(correct[test, j], pik[test, j]), "pre-generation probe": auroc(correct[test, j], router_p[test, j])}
        for j in range(k - 1)
    }

    target = float(correct[calib].mean(axis=0).max()) - 0.01
    results, curves = [], {}

    def record(name, chosen_fn, flops_fn, points_fn):
        """Calibrate on the calibration half, report on the test half."""
        pts = points_fn(calib)
        feasible = [p for p in pts if p["accuracy"] >= target - 1e-12] or [max(pts, key=lambda p: p["accuracy"])]
        best = min(feasible, key=lambda p: (p["cost"], -p["accuracy"]))
        chosen, spent = chosen_fn(best, test), flops_fn(best, test)
        rows = np.flatnonzero(test)
        results.append({"method": name, "accuracy": float(correct[rows, chosen].mean()), "gflops": float(spent.mean()),
                        "share": np.bincount(chosen, minlength=k).tolist(), "setting": best.get("setting")})
        # only the envelope is kept: the hybrid alone searches ~160,000 settings
        curves[name] = [(float(p["cost"]), float(p["accuracy"])) for p in frontier(points_fn(test))]

    for j, model in enumerate(LADDER):
        results.append({"method": f"only {model}", "accuracy": float(correct[test, j].mean()),
                        "gflops": float(flops[test, j].mean()), "share": [int(i == j) * int(test.sum()) for i in range(k)]})

    # pre-generation router: cheapest rung with P(success) >= tau
    def router_choice(tau, rows):
        ok = router_p[rows] >= tau
        return np.where(ok.any(axis=1), ok.argmax(axis=1), k - 1)

    def router_points(rows):
        out = []
        for tau in np.linspace(0, 1, 101):
            c = router_choice(tau, rows)
            idx = np.flatnonzero(rows)
            out.append({"setting": {"tau": float(tau)}, "accuracy": float(correct[idx, c].mean()),
                        "cost": float((flops[idx, c] + router_flops[idx]).mean())})
        return out

    record("pre-generation router", lambda p, rows: router_choice(p["setting"]["tau"], rows),
           lambda p, rows: flops[np.flatnonzero(rows), router_choice(p["setting"]["tau"], rows)] + router_flops[rows],
           router_points)

    def cascade_points(policy, rows, start=None, extra=None):
        pts = policy.sweep(correct[rows], flops[rows], pt=pt[rows], pik=pik[rows], start=start, levels=11)
        for p in pts:
            p["setting"] = {"thresholds": p["thresholds"]}
            if extra is not None:
                p["cost"] += float(extra.mean())
        return pts

    def cascade_eval(policy, rows, setting, start=None):
        policy.set_thresholds(setting["thresholds"])
        sim = simulate(policy.accept_matrix(pt[rows], pik[rows]), correct[rows], flops[rows], start=start)
        return sim

    variants = {
        "cascade P(T)": CascadePolicy(LADDER, signals=("pt",)),
        "cascade P(IK)": CascadePolicy(LADDER, signals=("pik",)),
        "cascade P(T) or P(IK)": CascadePolicy(LADDER, signals=("pt", "pik")),
        "cascade learned P(T)+P(IK)": CascadePolicy(LADDER, signals=("pt", "pik"), combine="learned"),
    }
    variants["cascade learned P(T)+P(IK)"].fit_combiner(pt[calib], pik[calib], correct[calib])
    for name, policy in variants.items():
        record(name, lambda p, rows, pol=policy: cascade_eval(pol, rows, p["setting"])["chosen"],
               lambda p, rows, pol=policy: _tried_cost(cascade_eval(pol, rows, p["setting"])["chosen"], flops[rows]),
               lambda rows, pol=policy: cascade_points(pol, rows))

    # hybrid: the router skips rungs it expects to fail, then the P(T)-or-P(IK) cascade runs from there
    hybrid = CascadePolicy(LADDER, signals=("pt", "pik"))

    start_rung = router_choice  # the first rung the router expects to clear `skip`, else the top

    def hybrid_points(rows):
        out = []
        for skip in np.linspace(0, 0.5, 11):
            start = start_rung(skip, rows)
            for p in cascade_points(hybrid, rows, start=start, extra=router_flops[rows]):
                p["setting"]["skip"] = float(skip)
                out.append(p)
        return out

    def hybrid_sim(p, rows):
        start = start_rung(p["setting"]["skip"], rows)
        return cascade_eval(hybrid, rows, p["setting"], start=start), start

    def hybrid_flops(p, rows):
        sim, start = hybrid_sim(p, rows)
        return _tried_cost(sim["chosen"], flops[rows], start) + router_flops[rows]

    record("hybrid: router start + cascade", lambda p, rows: hybrid_sim(p, rows)[0]["chosen"], hybrid_flops,
           hybrid_points)

    seconds = {m: float(np.mean(r["seconds"])) for m, r in zip(LADDER, runs)}
    payload = {"n": n, "non_embedding_params": dict(zip(LADDER, params)), "test_rows": int(test.sum()), "machine": machine(), "ladder": LADDER,
               "target_accuracy_calibration": target, "pt_reduction": best_reduce,
               "auroc_rung_right_test": signal_auc, "auroc_pt_calibration": auc_small,
               "accuracy_all_rows": correct.mean(axis=0).tolist(), "seconds_per_question": seconds,
               "results": results, "curves": curves}
    lines = [
        f"{description}; thresholds calibrated on "
        f"{int(calib.sum())} rows to stay within 1 point of the best single model there ({target + 0.01:.3f}), "
        f"reported on the other {int(test.sum())}. Machine: {machine()}.",
        "",
        f"| method | accuracy | GFLOPs / query | answers served by 135M / 0.5B / 1.5B (of {int(test.sum())}) |",
        "|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['gflops']:.1f} | {' / '.join(map(str, r['share']))} |")
    lines += ["", f"AUROC of each signal for \"this rung answers correctly\" on the test half "
              f"(P(T) reduction used by the cascade: {REDUCTION_NAMES[best_reduce]}):", "",
              "| signal | " + " | ".join(LADDER[:-1]) + " |", "|---" * k + "|"]
    lines += [f"| {s} | " + " | ".join(f"{signal_auc[m][s]:.3f}" for m in LADDER[:-1]) + " |" for s in signal_auc[LADDER[0]]]
    lines += ["", "Seconds per question (generation, 2 cores): "
              + ", ".join(f"{m} {s:.2f}" for m, s in seconds.items())]
    name = "cascade_ladder" + (f"_{args.options}options" if args.options else "")
    payload |= {"task": task, "description": description}
    write_results(name, "\n".join(lines), payload)
    plot(curves, results, name, task)
    print("\n".join(lines))


def _tried_cost(chosen, flops_rows, start=None):
    n, k = flops_rows.shape
    start = np.zeros(n, dtype=int) if start is None else start
    rungs = np.arange(k)[None, :]
    tried = (rungs >= start[:, None]) & (rungs <= chosen[:, None])
    return (flops_rows * tried).sum(axis=1)


def plot(curves, results, name: str, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _common import RESULTS

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, pts in curves.items():
        pts = np.array(pts)  # already the frontier: best accuracy reachable at or below each cost
        ax.step(pts[:, 0], pts[:, 1], where="post", label=method)
    for r in results:
        if r["method"].startswith("only"):
            ax.scatter([r["gflops"]], [r["accuracy"]], marker="*", s=120, zorder=5)
            ax.annotate(r["method"][5:], (r["gflops"], r["accuracy"]), fontsize=8)
    ax.set_xlabel("GFLOPs per query (all attempts counted)")
    ax.set_ylabel("accuracy (test half)")
    ax.set_title(f"Cascade SmolLM2-135M -> Qwen-Coder-0.5B -> 1.5B, {task}\n(envelope of every threshold setting on the test half)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
