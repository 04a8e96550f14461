"""``difficulty-router label`` on 200 real prompts against local llama.cpp models, with an LLM judge.

Prompts: a seeded sample of MMLU-Pro questions (``../shared/data/mmlu_pro/questions.jsonl.gz``,
Apache-2.0) whose question plus lettered options is at most ``--max-chars`` characters (short
ones, so the run fits the shared 2-core box; a selection, said in the results), each asking for
the letter only; the reference is the gold letter.

Pool: two differently configured SmolLM2-135M-Instruct servers (llama-cpp-python, one thread
each, ``tests/llama_servers.py``): ``terse`` (system "Answer with the letter only.", temperature
0, 8 tokens) and ``chatty`` (temperature 0.7, 16 tokens); the judge is a third server on the same
GGUF. Only SmolLM2 is on this box, so answers and judgements are weak: the figures are about
the labelling machinery (throughput, how often the judge's reply parses, how far its verdict
can be trusted), not about model quality.

One timed labelling run (what ``difficulty-router label`` runs: ``config_from_pool_file`` and
``Labeller.run``) grades every answer with the judge (1-5 score, correct when >= 4). The judge's
reply is grammar-constrained to "Score: N" (llama.cpp GBNF through a custom ``Backend``): asked in
plain chat, SmolLM2-135M echoes the answer instead of scoring it. By default the judge does not
see the reference (the situation a judge is for: no reference exists); ``--judge-sees-reference``
shows it. The same answers, read back from the journal, are then graded with the reference grader
(``choice``: the letter in the answer equals the gold letter); the agreement of the two verdicts on
every (prompt, model) pair the judge graded has a 95% bootstrap interval over prompts, with
Cohen's kappa.

    nice -n 19 python benchmarks/label_run.py --time-limit-s 3240   # the committed run; about an hour on 2 busy cores
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import machine, md_table, need_data, write_results
from llama_servers import llama_server, smollm2_gguf

from difficulty_router.data.graders import get_grader
from difficulty_router.data.labelling import (
    Backend,
    Labeller,
    Reply,
    config_from_pool_file,
    journal_path,
    openai_backend,
    read_journal,
    read_prompt_rows,
)

LETTERS = "ABCDEFGHIJ"
SCORE_GRAMMAR = 'root ::= "Score: " [1-5]'  # llama.cpp GBNF: the judge can only say "Score: N"


def constrained_judge(base_url: str, alias: str) -> Backend:
    """The judge through llama.cpp's grammar-constrained decoding: SmolLM2-135M asked for "Score: N" in
    plain chat echoes the answer instead (every reply unparsable on a 6-prompt trial: 12 of 12
    skipped), so its reply is constrained to the score format; which score it picks is its own."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=300.0, max_retries=0)

    def call(messages: list[dict], settings: dict) -> Reply:
        extra = {k: settings[k] for k in ("temperature", "max_tokens") if k in settings}
        response = client.chat.completions.create(
            model=alias, messages=messages, extra_body={"grammar": SCORE_GRAMMAR}, **extra
        )
        usage = response.usage
        return Reply(
            response.choices[0].message.content or "",
            usage.prompt_tokens if usage else None,
            usage.completion_tokens if usage else None,
        )

    return Backend("judge", call, None)


def sample_prompts(n: int, max_chars: int, seed: int) -> tuple[list[dict], int]:
    with gzip.open(need_data("mmlu_pro/questions.jsonl.gz"), "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    short = [r for r in rows if len(r["question"]) + sum(len(o) + 4 for o in r["options"]) <= max_chars]
    pick = np.random.default_rng(seed).choice(len(short), size=min(n, len(short)), replace=False)
    out = []
    for i in sorted(pick):
        r = short[i]
        options = "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(r["options"]))
        prompt = f"{r['question']}\n{options}\nAnswer with the letter of the correct option."
        out.append({"id": f"mmlu-pro-{r['question_id']}", "prompt": prompt, "reference": r["answer"]})
    return out, len(short)


def bootstrap_agreement(pairs: list[tuple[str, bool, bool]], seed: int, resamples: int = 2000) -> dict:
    """Agreement (share of equal verdicts) and Cohen's kappa; 95% interval resampling prompts."""
    ids = sorted({p[0] for p in pairs})
    by_id: dict[str, list[tuple[bool, bool]]] = {i: [] for i in ids}
    for i, judge, ref in pairs:
        by_id[i].append((judge, ref))

    def stats(chosen: list[str]) -> tuple[float, float]:
        v = np.array([x for i in chosen for x in by_id[i]], dtype=float)
        agree = float((v[:, 0] == v[:, 1]).mean())
        pj, pr = v[:, 0].mean(), v[:, 1].mean()
        chance = pj * pr + (1 - pj) * (1 - pr)
        kappa = float((agree - chance) / (1 - chance)) if chance < 1 else float("nan")
        return agree, kappa

    agree, kappa = stats(ids)
    rng = np.random.default_rng(seed)
    draws = np.array([stats([ids[k] for k in rng.integers(0, len(ids), len(ids))]) for _ in range(resamples)])
    return {
        "pairs": len(pairs),
        "prompts": len(ids),
        "agreement": agree,
        "agreement_ci": [float(x) for x in np.nanpercentile(draws[:, 0], [2.5, 97.5])],
        "kappa": kappa,
        "kappa_ci": [float(x) for x in np.nanpercentile(draws[:, 1], [2.5, 97.5])],
        "judge_correct_rate": float(np.mean([p[1] for p in pairs])),
        "reference_correct_rate": float(np.mean([p[2] for p in pairs])),
    }


class TimeLimitReached(RuntimeError):
    """Raised instead of starting a call after ``--time-limit-s``: the row is journalled as an error."""


def within(backend: Backend, deadline: float) -> Backend:
    """``backend``, refusing to start calls after ``deadline`` (perf_counter seconds)."""

    def call(messages: list[dict], settings: dict) -> Reply:
        if time.perf_counter() > deadline:
            raise TimeLimitReached("the benchmark's time limit was reached before this call started")
        return backend.call(messages, settings)

    return Backend(backend.name, call, backend.spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-chars", type=int, default=400, help="longest question + options kept")
    ap.add_argument("--concurrency", type=int, default=2, help="concurrent calls per model")
    ap.add_argument("--judge-sees-reference", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--time-limit-s",
        type=float,
        default=3600,
        help="start no call after this many seconds (on a loaded box the run may not finish; what did is reported)",
    )
    ap.add_argument("--name", default="label_run")
    args = ap.parse_args()

    rows, eligible = sample_prompts(args.prompts, args.max_chars, args.seed)
    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        prompt_file = tmp_path / "prompts.jsonl"
        with open(prompt_file, "w", encoding="utf-8") as fh:
            for r in rows:
                keep = r if args.judge_sees_reference else {k: v for k, v in r.items() if k != "reference"}
                fh.write(json.dumps(keep) + "\n")
        with (
            llama_server(gguf, "terse") as terse_url,
            llama_server(gguf, "chatty") as chatty_url,
            llama_server(gguf, "judge") as judge_url,
        ):
            pool = {
                "models": [
                    {"name": "terse", "base_url": terse_url, "model": "terse", "cost_per_query": 0.0001},
                    {"name": "chatty", "base_url": chatty_url, "model": "chatty", "cost_per_query": 0.0002},
                ],
                "label": {
                    "threshold": 4,
                    "generation": {
                        "terse": {"system": "Answer with the letter only.", "temperature": 0.0, "max_tokens": 8},
                        "chatty": {"temperature": 0.7, "max_tokens": 16},
                    },
                },
            }
            pool_file = tmp_path / "pool.json"
            pool_file.write_text(json.dumps(pool))
            out = tmp_path / "labels.jsonl"
            load_before = os.getloadavg()
            start = time.perf_counter()
            # what `difficulty-router label` runs (cli.label.cmd_label), with the judge grammar-constrained
            pool_models, config = config_from_pool_file(pool_file, concurrency=args.concurrency)
            config.judge = constrained_judge(judge_url, "judge")
            deadline = time.perf_counter() + args.time_limit_s
            config.judge = within(config.judge, deadline)
            labeller = Labeller([within(openai_backend(m), deadline) for m in pool_models.models], config)
            report = labeller.run(read_prompt_rows(prompt_file), out, progress=True)
            print(report.table())
            wall = time.perf_counter() - start
            load_after = os.getloadavg()
            records = read_journal(journal_path(out))
            written = sum(1 for line in out.read_text().splitlines() if line.strip())
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    reference = {r["id"]: r["reference"] for r in rows}
    grade = get_grader("choice")
    model_calls = [r for r in records if "answer" in r]
    timed_out = sum("TimeLimitReached" in str(r.get("error", "")) for r in records)
    finished_prompts = len({r["id"] for r in model_calls})
    judge_calls = [r for r in records if "judge_reply" in r]
    calls = len(model_calls) + len(judge_calls)
    graded = [r for r in records if r["status"] == "graded"]
    pairs = [(r["id"], bool(r["score"] >= 0.5), bool(grade(r["answer"], reference[r["id"]]))) for r in graded]
    agreement = bootstrap_agreement(pairs, args.seed)
    per_model = {}
    for m in ("terse", "chatty"):
        mine = [r for r in records if r["model"] == m]
        answered = [r for r in mine if "answer" in r]
        per_model[m] = {
            "answered": len(answered),
            "judge_graded": sum(r["status"] == "graded" for r in mine),
            "judge_skipped": sum(r["status"] == "skipped" for r in mine),
            "errors": sum(r["status"] == "error" for r in mine),
            "reference_accuracy": float(np.mean([grade(r["answer"], reference[r["id"]]) for r in answered])),
            "mean_latency_s": float(np.mean([r["latency_s"] for r in answered])),
            "agreement": bootstrap_agreement(
                [p for p, r in zip(pairs, graded, strict=True) if r["model"] == m], args.seed
            )
            if any(r["model"] == m for r in graded)
            else None,
        }

    payload = {
        "machine": machine(),
        "uptime_after": uptime,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "prompts": len(rows),
        "prompts_answered": finished_prompts,
        "calls_not_started_time_limit": timed_out,
        "time_limit_s": args.time_limit_s,
        "eligible_prompts": eligible,
        "max_chars": args.max_chars,
        "seed": args.seed,
        "judge_sees_reference": args.judge_sees_reference,
        "concurrency_per_model": args.concurrency,
        "wall_s": wall,
        "model_calls": len(model_calls),
        "judge_calls": len(judge_calls),
        "calls_per_s": calls / wall,
        "training_rows_written": written,
        "per_model": per_model,
        "judge_vs_reference": agreement,
    }
    a = agreement
    table = md_table(
        [
            "prompts",
            "calls (model + judge)",
            "wall time",
            "calls/s",
            "training rows",
            "judge skipped",
            "judge-reference agreement [95% CI]",
            "Cohen's kappa [95% CI]",
        ],
        [
            [
                f"{len(rows)} ({finished_prompts} answered)",
                f"{len(model_calls)} + {len(judge_calls)}",
                f"{wall:.0f} s",
                f"{calls / wall:.2f}",
                written,
                sum(v["judge_skipped"] for v in per_model.values()),
                f"{a['agreement']:.3f} [{a['agreement_ci'][0]:.3f}, {a['agreement_ci'][1]:.3f}] ({a['pairs']} pairs)",
                f"{a['kappa']:.3f} [{a['kappa_ci'][0]:.3f}, {a['kappa_ci'][1]:.3f}]",
            ]
        ],
    )
    model_rows = []
    for m, v in per_model.items():
        ag = v["agreement"]
        model_rows.append(
            [
                m,
                v["answered"],
                f"{v['reference_accuracy']:.3f}",
                v["judge_graded"],
                v["judge_skipped"],
                v["errors"],
                f"{v['mean_latency_s']:.2f} s",
                f"{ag['agreement']:.3f} [{ag['agreement_ci'][0]:.3f}, {ag['agreement_ci'][1]:.3f}]" if ag else "-",
            ]
        )
    lo, hi = a["kappa_ci"]
    reading = (
        "Cohen's kappa is undefined here (one side gave a single verdict throughout)."
        if not np.isfinite(a["kappa"])
        else f"the judge's verdicts agree with the reference grader no better than chance (kappa interval "
        f"[{lo:.2f}, {hi:.2f}] holds 0): with a judge this small, use a reference grader when references "
        "exist and a much larger judge when they do not."
        if lo <= 0 <= hi
        else f"the judge agrees with the reference grader beyond chance (kappa {a['kappa']:.2f}, "
        f"[{lo:.2f}, {hi:.2f}]), yet far from a reference grader's certainty."
    )
    markdown = f"""# `difficulty-router label`: 200 prompts, two llama.cpp models and a judge

Command: `nice -n 19 python benchmarks/label_run.py{" --judge-sees-reference" if args.judge_sees_reference else ""}{
        f" --time-limit-s {args.time_limit_s:g}" if args.time_limit_s != 3600 else ""
    }`
(prompts {len(rows)}, seed {args.seed}, concurrency {args.concurrency} per model).

Machine: {machine()}; shared with other jobs, load average {load_before[0]:.2f} before and
{load_after[0]:.2f} after the run (`uptime`: {uptime}); this run was under `nice -n 19`, so wall
time and calls per second are what a busy box gave, not a speed target.

Prompts: a seeded sample of {len(rows)} of the {eligible} MMLU-Pro questions whose question and options
fit in {args.max_chars} characters (short ones only, to fit the box), asking for the letter. Pool: two
SmolLM2-135M-Instruct llama-cpp-python servers, `terse` (letter only, temperature 0, 8 tokens) and
`chatty` (temperature 0.7, 16 tokens); judge: a third SmolLM2-135M server (1-5 score, correct at >= 4, its
reply grammar-constrained to `Score: N`),
{"shown" if args.judge_sees_reference else "not shown"} the reference. One thread per server.

{table}

{
        f"Time limit: no call was started after {args.time_limit_s:.0f} s; {timed_out} (prompt, model) calls were "
        f"not started (journalled as errors, a re-run would resume them). Figures are over the calls that finished."
        if timed_out
        else "Every call finished within the time limit."
    }

Per pool model (reference accuracy: the `choice` grader on every answer; agreement: the judge's verdict
vs the reference grader's on the pairs the judge graded, 95% bootstrap interval over prompts):

{
        md_table(
            [
                "model",
                "answered",
                "reference accuracy",
                "judge graded",
                "judge skipped",
                "errors",
                "mean latency",
                "agreement [95% CI]",
            ],
            model_rows,
        )
    }

Reading: {reading} "Judge skipped" rows are replies without a parsable 1-5 score: kept out of the
training file with their reason in the journal, never a crash.
"""
    write_results(args.name, markdown, payload)


if __name__ == "__main__":
    main()
