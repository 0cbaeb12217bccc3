"""The speed race of section 1 against the bare script with vLLM's engine in-process too, the two
levers issue 22 names, and where the runner's end-to-end time goes (from its daemon log).

Runners, interleaved by round: `generate-inproc` (bench/baselines.py, engine in-process); `d`, one
drop into `run --once`; `d8`, the same lines as 8 drops (a window filled from several tasks). The
other lever, a lone task fed all at once, was measured with a knob of the feeding loop that did
not land (docs/benchmarks.md). `python bench/race_levers.py [--n 4000] [--rounds 2] [--runners ...]`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import ENV, PY, RACE_MODELS, chat_lines, race_once, write
from timeline import engine_load_lines, race_phases

RUNNERS = ("generate-inproc", "d", "d8")


def drops(tmp: Path, tag: str, inp: Path, parts: int) -> dict:
    """The race's lines as `parts` drops into one `run --once`: tokens, wall, gen tok/s from the
    markers (first line fed to last commit, over all tasks), and the phases of the run."""
    args, _ = RACE_MODELS["tiny-llama"]
    root = tmp / tag
    (root / "inbox/m").mkdir(parents=True)
    entry = json.dumps(
        {"path": str(Path(__file__).resolve().parents[1] / "models/tiny-llama"), "engine_args": args}
    )
    (root / "models.yaml").write_text(
        f"settings: {{settle_seconds: 0.2, max_shared_tasks: 8}}\nmodels:\n  m: {entry}\n"
    )
    body = inp.read_text().splitlines()
    per = -(-len(body) // parts)
    for i in range(parts):
        (root / f"inbox/m/.j{i}.tmp").write_text("\n".join(body[i * per : (i + 1) * per]) + "\n")
    t0 = time.time()
    for i in range(parts):
        os.replace(root / f"inbox/m/.j{i}.tmp", root / f"inbox/m/j{i}.jsonl")
    subprocess.run(
        [PY, "-m", "dropbox_runner", "run", "--once", "--root", str(root), "--settle", "0.2"],
        capture_output=True,
        env=ENV,
        check=True,
    )
    t_exit = time.time()
    markers = [json.loads(m.read_text()) for m in (root / "state").glob("*/*/m.marker")]
    tokens = sum(m["completion_tokens"] for m in markers)
    span = max(m["updated_at"] for m in markers) - min(m["started_at"] for m in markers)
    phases = race_phases(root, t0, t_exit) if parts == 1 else {}
    return {
        "tokens": tokens,
        "wall_s": t_exit - t0,
        "gen_tps": tokens / span,
        "phases": phases,
        "vllm": engine_load_lines(root / "state/engine.log"),
        "load_average": os.getloadavg()[0],
    }


def one(runner: str, inp: Path, tmp: Path, tag: str) -> dict:
    if runner == "generate-inproc":
        args, _ = RACE_MODELS["tiny-llama"]
        r = race_once(runner, "tiny-llama", args, inp, tmp, tag)
        r["load_average"] = os.getloadavg()[0]
        return r
    if runner == "d8":
        return drops(tmp, tag, inp, 8)
    return drops(tmp, tag, inp, 1)


def bench_levers(tmp: Path, n: int, rounds: int, runners: tuple[str, ...]) -> dict:
    inp = write(tmp / "race.jsonl", chat_lines(n, 32, "tiny-llama"))
    runs: dict[str, list[dict]] = {r: [] for r in runners}
    for i in range(rounds):
        for runner in runners[i % len(runners) :] + runners[: i % len(runners)]:
            r = one(runner, inp, tmp, f"{runner}-{i}")
            r["e2e"] = r["tokens"] / r["wall_s"]
            runs[runner].append(r)
            print(
                f"round {i + 1} {runner}: gen {r['gen_tps']:,.0f} tok/s, end to end {r['e2e']:,.0f} tok/s, "
                f"wall {r['wall_s']:.1f} s, load avg {r['load_average']:.1f}",
                flush=True,
            )
            if r.get("phases"):
                print(
                    "  where its time went (s): "
                    + json.dumps(r["phases"])
                    + "; vLLM: "
                    + json.dumps(r["vllm"])
                )
    base = runs["generate-inproc"]
    print(
        f"\n## 1b. Speed race levers, tiny-llama compiled, {n:,} requests x 32 tokens, {rounds} interleaved "
        "rounds: ratios of medians to generate-inproc (each round's in brackets)\n"
    )
    print("| runner | gen tok/s | gen ratio | end-to-end tok/s | e2e ratio |\n|---|---|---|---|---|")
    out = {"runs": runs}
    for runner, rs in runs.items():
        g = statistics.median(x["gen_tps"] for x in rs) / statistics.median(x["gen_tps"] for x in base)
        e = statistics.median(x["e2e"] for x in rs) / statistics.median(x["e2e"] for x in base)
        each_g = ", ".join(f"{a['gen_tps'] / b['gen_tps']:.2f}" for a, b in zip(rs, base, strict=True))
        each_e = ", ".join(f"{a['e2e'] / b['e2e']:.2f}" for a, b in zip(rs, base, strict=True))
        print(
            f"| {runner} | {statistics.median(x['gen_tps'] for x in rs):,.0f} | {g:.2f} ({each_g}) | "
            f"{statistics.median(x['e2e'] for x in rs):,.0f} | {e:.2f} ({each_e}) |"
        )
        out[runner] = {"gen_ratio": g, "e2e_ratio": e}
    print()
    for runner in runners:
        if runner == "d":
            g = out[runner]["gen_ratio"]
            print(
                f"- {runner} gen / generate-inproc: {g:.2f} (target >= 0.97: {'met' if g >= 0.97 else 'NOT met'})"
            )
            e = out[runner]["e2e_ratio"]
            print(
                f"- {runner} end to end / generate-inproc: {e:.2f} (target >= 0.95: {'met' if e >= 0.95 else 'NOT met'})"
            )
    if "d" in runs:
        print("\nwhere d's end-to-end time went (s, each round):\n")
        for name in runs["d"][0]["phases"]:
            print(f"- {name}: " + ", ".join(f"{x['phases'].get(name, 0):.2f}" for x in runs["d"]))
        print(
            "- generate-inproc's load (s, each round): "
            + ", ".join(f"{x.get('load_s', 0):.2f}" for x in base)
        )
        print("- vLLM's own load lines (d, round 1): " + json.dumps(runs["d"][0]["vllm"]))
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runners", default=",".join(RUNNERS))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        bench_levers(Path(t), a.n, a.rounds, tuple(a.runners.split(",")))
