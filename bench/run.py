"""Benchmarks: dropbox_runner against the simple script and vLLM's batch runner, and its own costs.

Prints a table per benchmark and the ratios; `make bench` runs it (about 90 minutes here: the speed
race alone loads an engine 30 times). `--quick` uses smaller sizes for a smoke run; `--only 1,8`,
`--models tiny-llama` and `--rounds N` run less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
VLLM_ARGS = "{dtype: float32, max_model_len: 512, gpu_memory_utilization: 0.3}"


def chat_lines(n: int, max_tokens: int = 32, model: str = "tiny-llama") -> list[str]:
    return [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Tell me story {i}"}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            }
        )
        for i in range(n)
    ]


def run_alone(cmd: list[str], tmp: Path, env: dict | None = None) -> str:
    """Run a command in its own process group, return its stdout, and end whatever it left behind
    (vLLM's engine processes can outlive a script that ends with os._exit)."""
    out = tmp / f"out-{time.monotonic_ns()}.txt"
    with open(out, "wb") as f:
        p = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.DEVNULL, env={**ENV, **(env or {})}, start_new_session=True
        )
        code = p.wait()
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if code != 0:
        raise RuntimeError(f"{cmd[:4]} exited with {code}")
    return out.read_text()


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def make_root(base: Path, settings: str = "settle_seconds: 0.5", vllm_args: str = VLLM_ARGS) -> Path:
    root = base / "root"
    root.mkdir(parents=True)
    models = REPO / "models"
    (root / "models.yaml").write_text(f"""settings: {{{settings}}}
models:
  tiny-llama: {{path: {models}/tiny-llama, engine_args: {vllm_args}}}
  tiny-qwen: {{path: {models}/tiny-qwen, engine_args: {vllm_args}}}
  echo: {{engine: echo, engine_args: {{max_in_flight: 1024}}}}
  paced: {{engine: echo, engine_args: {{delay_ms: 5, max_in_flight: 256}}}}
""")
    return root


def daemon(root: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "dropbox_runner", "run", "--root", str(root), *args],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "bench.log", "ab"),
        env=ENV,
        **kw,
    )


def batch(root: Path, name: str) -> dict | None:
    try:
        return json.loads((root / "outbox" / name / "batch.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{c:,.2f}" if isinstance(c, float) else str(c) for c in r) + " |")
    sys.stdout.flush()


def ratio_of_medians(ours: list[dict], base: list[dict], key: str) -> tuple[float, list[float]]:
    """The ratio of the medians of `key`, and the ratio in each round (runs paired by round)."""
    ratio = statistics.median(x[key] for x in ours) / statistics.median(x[key] for x in base)
    return ratio, [o[key] / b[key] for o, b in zip(ours, base, strict=True)]


# -- 1. the speed race: the runner against bare vLLM, interleaved rounds -------------------------------
RACE_MODELS = {
    # model (a folder under models/): engine args, requests in the full run
    "tiny-llama": ({"dtype": "float32", "max_model_len": 512, "gpu_memory_utilization": 0.3}, 4000),
    "smollm2": (
        {"dtype": "float32", "max_model_len": 2048, "gpu_memory_utilization": 0.25, "enforce_eager": True},
        600,
    ),
}


def run_batch_cmd(model: str, args: dict, inp: Path, out: Path) -> list[str]:
    cmd = [PY, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out)]
    cmd += ["--model", str(REPO / "models" / model), "--served-model-name", model]
    cmd += ["--dtype", args["dtype"], "--max-model-len", str(args["max_model_len"])]
    cmd += ["--gpu-memory-utilization", str(args["gpu_memory_utilization"])]
    return cmd + (["--enforce-eager"] if args.get("enforce_eager") else [])


def race_once(runner: str, model: str, args: dict, inp: Path, tmp: Path, tag: str) -> dict:
    """One run of one runner: tokens, wall seconds (process start to last result written) and
    generation tokens/s (first request handed to the engine to the last result)."""
    t0 = time.time()
    if runner in ("generate", "chunked", "generate-inproc"):
        mode = runner.split("-")[0]
        cmd = [PY, str(REPO / "bench/baselines.py"), mode, str(REPO / "models" / model), str(inp)]
        # generate-inproc: the same script with vLLM's engine core in its process, as the runner has it
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if runner.endswith("inproc") else None
        printed = run_alone([*cmd, str(tmp / f"{tag}.out"), json.dumps(args)], tmp, env).splitlines()
        r = json.loads(next(x for x in printed if x.startswith('{"load_s"')))
        wall = time.time() - t0
        return {
            "tokens": r["tokens"],
            "wall_s": wall,
            "gen_tps": r["tokens"] / r["gen_s"],
            "load_s": r["load_s"],
        }
    if runner == "run_batch":
        run_alone(run_batch_cmd(model, args, inp, tmp / f"{tag}.out"), tmp)
        wall = time.time() - t0
        tokens = sum(
            json.loads(x)["response"]["body"]["usage"]["completion_tokens"] for x in open(tmp / f"{tag}.out")
        )
        return {"tokens": tokens, "wall_s": wall, "gen_tps": None}
    entry = json.dumps({"path": str(REPO / "models" / model), "engine_args": args})
    b, wall = run_drop(tmp, tag, entry, inp, model)
    m = b["models"][model]
    return {"tokens": m["usage"]["completion_tokens"], "wall_s": wall, "gen_tps": m["tokens_per_second"]}


RUNNERS = ("generate", "dropbox_runner", "chunked", "run_batch", "generate-inproc")
RACE_RATIOS = (  # name, runner, baseline, metric, target
    ("gen tok/s vs bare LLM.chat (a)", "generate", "gen_tps", 1.0),
    ("gen tok/s vs chunks of 100 saved (b)", "chunked", "gen_tps", 1.25),
    ("end to end vs run_batch (c)", "run_batch", "e2e", 1.1),
    ("end to end vs bare LLM.chat (a)", "generate", "e2e", None),
    ("gen tok/s vs bare LLM.chat, engine in-process too", "generate-inproc", "gen_tps", None),
    ("end to end vs bare LLM.chat, engine in-process too", "generate-inproc", "e2e", None),
)


def bench_race(model: str, n: int, rounds: int, tmp: Path) -> dict:
    args, _ = RACE_MODELS[model]
    inp = write(tmp / f"race-{model}.jsonl", chat_lines(n, 32, model))
    runs: dict[str, list[dict]] = {r: [] for r in RUNNERS}
    for i in range(rounds):  # interleaved: every runner once per round, the order rotating
        for runner in RUNNERS[i % len(RUNNERS) :] + RUNNERS[: i % len(RUNNERS)]:
            r = race_once(runner, model, args, inp, tmp, f"race-{model}-{runner}-{i}")
            r["e2e"] = r["tokens"] / r["wall_s"]
            runs[runner].append(r)
    med = {
        (runner, k): statistics.median(x[k] for x in rs)
        for runner, rs in runs.items()
        for k in ("e2e", "gen_tps", "wall_s")
        if rs[0][k] is not None
    }
    rows = [
        [
            runner,
            rs[0]["tokens"],
            med[(runner, "wall_s")],
            med.get((runner, "gen_tps"), "-"),
            " / ".join(f"{x['gen_tps']:,.0f}" for x in rs) if rs[0]["gen_tps"] else "-",
            med[(runner, "e2e")],
        ]
        for runner, rs in runs.items()
    ]
    table(
        f"1. Speed race, {model} ({', '.join(f'{k} {v}' for k, v in args.items())}), {n:,} chat requests "
        f"x 32 tokens (greedy, ignore_eos), {rounds} interleaved rounds; medians",
        ["runner", "tokens", "wall s", "gen tok/s", "gen tok/s of each round", "end-to-end tok/s"],
        rows,
    )
    ratios = {}
    print()
    for name, base, metric, target in RACE_RATIOS:
        ratio, each = ratio_of_medians(runs["dropbox_runner"], runs[base], metric)
        ratios[name] = {"ratio_of_medians": ratio, "per_round": each, "target": target}
        verdict = ""
        if target is not None:
            verdict = f" (target >= {target:.2f}: {'met' if ratio >= target else 'NOT met'})"
        print(
            f"- {name}: {ratio:.2f}{verdict}; rounds {', '.join(f'{x:.2f}' for x in each)} "
            f"(spread {min(each):.2f}-{max(each):.2f})"
        )
    sys.stdout.flush()
    return {"runs": runs, "ratios": ratios}


# -- 8. shared prefixes: prefix-aware feeding against input order --------------------------------
WORDS = (
    "river stone policy market engine harbor signal winter garden ledger protein circuit meadow "
    "contract glacier lantern orbit quarry ribbon saddle timber valley whistle anchor beacon canyon "
    "delta ember falcon granite horizon island jungle kettle lagoon marble nectar oasis prairie"
).split()


def prefix_lines(docs: int, questions: int, doc_tokens: int, max_tokens: int, seed: int = 5) -> list[str]:
    """`docs` documents of about `doc_tokens` tokens, `questions` questions on each, lines shuffled."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REPO / "models/tiny-llama"))
    rng = random.Random(seed)
    lines = []
    for d in range(docs):
        text = f"Document {d}. " + " ".join(rng.choice(WORDS) for _ in range(doc_tokens))
        text = tok.decode(tok.encode(text, add_special_tokens=False)[:doc_tokens])
        for q in range(questions):
            lines.append(
                {
                    "url": "/v1/chat/completions",
                    "body": {
                        "messages": [
                            {"role": "system", "content": text},
                            {
                                "role": "user",
                                "content": f"Question {q}: what does it say about {rng.choice(WORDS)}?",
                            },
                        ],
                        "max_tokens": max_tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                    },
                }
            )
    rng.shuffle(lines)
    return [json.dumps({"custom_id": f"r{i}", **x}) for i, x in enumerate(lines)]


def run_drop(tmp: Path, name: str, entry: str, lines: Path, model: str = "m") -> tuple[dict, float]:
    """One drop run by `run --once` on a root with the one model entry: its batch.json and the wall
    time from the drop to the published outbox (daemon start and engine load included)."""
    root = tmp / name
    (root / f"inbox/{model}").mkdir(parents=True)
    (root / "models.yaml").write_text(f"settings: {{settle_seconds: 0.2}}\nmodels:\n  {model}: {entry}\n")
    t0 = time.time()
    os.link(lines, root / f"inbox/{model}/job.jsonl")
    subprocess.run(
        [PY, "-m", "dropbox_runner", "run", "--once", "--root", str(root), "--settle", "0.2"],
        capture_output=True,
        env=ENV,
        check=True,
    )
    return batch(root, "job"), time.time() - t0


def bench_prefix(tmp: Path, quick: bool, rounds: int) -> dict:
    """Prefix-aware feeding against input order, on a KV cache that holds 40 % of the documents
    (interleaved rounds, as a GPU with a corpus larger than its cache), then once on one that holds
    them all."""
    docs, questions = (20, 20) if quick else (100, 20)
    src = write(tmp / "prefix.jsonl", prefix_lines(docs, questions, 800, 16))
    small = docs * 800 * 2048 * 2 // 5  # tiny-llama keeps 2,048 bytes of KV per token
    out = {}
    for label, kv, n_rounds in (("40 % of the documents", small, rounds), ("all of them", None, 1)):
        args = {
            "dtype": "float32",
            "max_model_len": 1024,
            "gpu_memory_utilization": 0.3,
            "enforce_eager": True,
        }
        if kv:
            args["kv_cache_memory_bytes"] = kv
        runs: dict[str, list[dict]] = {"input": [], "prefix": []}
        for r in range(n_rounds):
            for order in ("input", "prefix") if r % 2 == 0 else ("prefix", "input"):
                entry = json.dumps(
                    {"path": str(REPO / "models/tiny-llama"), "engine_args": args, "feed_order": order}
                )
                b, wall = run_drop(tmp, f"prefix-{bool(kv)}-{order}-{r}", entry, src)
                m = b["models"]["m"]
                runs[order].append(
                    {
                        "tok_s": m["tokens_per_second"],
                        "prompt_tokens": m["usage"]["prompt_tokens"],
                        "cached_tokens": m["usage"]["prompt_tokens_details"]["cached_tokens"],
                        "wall_s": wall,
                    }
                )
        rows = []
        for order, rs in runs.items():
            tps = [x["tok_s"] for x in rs]
            cached = statistics.median(x["cached_tokens"] for x in rs)
            rows.append(
                [
                    order,
                    statistics.median(tps),
                    " / ".join(f"{x:,.0f}" for x in tps),
                    rs[0]["prompt_tokens"],
                    int(cached),
                    100 * cached / rs[0]["prompt_tokens"],
                ]
            )
        ratio, each = ratio_of_medians(runs["prefix"], runs["input"], "tok_s")
        table(
            f"8. Shared prefixes, KV cache for {label}: {docs} documents of 800 tokens x {questions} "
            f"questions, shuffled, tiny-llama (16 tokens each), {n_rounds} interleaved round(s)",
            ["feed_order", "gen tok/s (median)", "each round", "prompt tokens", "cached tokens", "cached %"],
            rows,
        )
        print(
            f"\nprefix/input gen tok/s = {ratio:.2f} (ratio of medians; rounds "
            + ", ".join(f"{x:.2f}" for x in each)
            + (", target >= 1.30)" if kv else ")")
        )
        out[label] = {"runs": runs, "ratio": ratio, "per_round": each}
    return out


# -- 2. overhead on the echo engine -----------------------------------------------------------------
def peak_rss_mb(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0.0
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def bench_overhead(sizes: list[int], tmp: Path) -> dict:
    rows, out = [], {}
    for n in sizes:
        root = make_root(tmp / f"echo{n}")
        (root / "inbox/echo").mkdir(parents=True)
        src = write(
            tmp / f"echo{n}.jsonl",
            [
                json.dumps(
                    {
                        "custom_id": f"r{i}",
                        "url": "/v1/chat/completions",
                        "body": {"messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 4},
                    }
                )
                for i in range(n)
            ],
        )
        p = daemon(root, "--settle", "0.2")
        t0 = time.time()
        os.link(src, root / "inbox/echo/big.jsonl")
        peak = 0.0
        while not ((b := batch(root, "big")) and b["status"] == "completed"):
            peak = max(peak, peak_rss_mb(p.pid))
            time.sleep(0.05)
        wall = time.time() - t0
        peak = max(peak, peak_rss_mb(p.pid))
        p.send_signal(signal.SIGTERM)
        p.wait()
        run = b["models"]["echo"]["completed_at"] - b["models"]["echo"]["started_at"]
        rows.append([n, wall, n / wall, peak])
        out[n] = {"wall_s": wall, "req_per_s": n / wall, "daemon_peak_rss_mb": peak, "run_s": run}
    table(
        "2. Overhead alone: echo engine, drop to published outbox",
        ["requests", "wall s", "requests/s", "daemon peak RSS MB"],
        rows,
    )
    return out


# -- 7. scaling: several copies of a model, local and on Ray ---------------------------------------
def echo_lines(n: int) -> list[str]:
    return [
        json.dumps(
            {
                "custom_id": f"r{i}",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"q {i}"}], "max_tokens": 4},
            }
        )
        for i in range(n)
    ]


def run_copies(tmp: Path, name: str, entry: str, lines: Path, settings: str = "") -> dict:
    """One drop on a model entry, run by a daemon: wall time of the run, requests/s, daemon peak RSS."""
    root = tmp / name
    (root / "inbox/m").mkdir(parents=True)
    (root / "state").mkdir()
    (root / "models.yaml").write_text(
        f"settings: {{settle_seconds: 0.2, ray_address: local{settings}}}\nmodels:\n  m: {entry}\n"
    )
    p = daemon(root, "--settle", "0.2")
    os.link(lines, root / "inbox/m/job.jsonl")
    peak = 0.0
    while not ((b := batch(root, "job")) and b["status"] in ("completed", "failed")):
        peak = max(peak, peak_rss_mb(p.pid))
        time.sleep(0.1)
    peak = max(peak, peak_rss_mb(p.pid))
    p.send_signal(signal.SIGTERM)
    p.wait()
    m = b["models"]["m"]
    run = m["completed_at"] - m["started_at"]
    n = b["request_counts"]["total"]
    return {"run_s": run, "req_per_s": n / run if run > 0 else 0.0, "daemon_peak_rss_mb": peak}


def bench_scaling(tmp: Path, quick: bool) -> dict:
    paced_n = 4000 if quick else 20000
    paced = write(tmp / "paced.jsonl", echo_lines(paced_n))
    pace = "engine_args: {delay_ms: 20, max_in_flight: 16}"  # 800 req/s per copy, by sleeping
    rows, out = [], {}
    for executor in ("local", "ray"):
        for copies in (1, 2, 4):
            entry = f"{{engine: echo, replicas: {copies}, executor: {executor}, {pace}}}"
            r = run_copies(tmp, f"paced-{executor}-{copies}", entry, paced)
            out[f"{executor}-{copies}"] = r
            base = out[f"{executor}-1"]["req_per_s"]
            rows.append([executor, copies, r["run_s"], r["req_per_s"], r["req_per_s"] / base if base else 0])
    table(
        f"7a. Scaling, echo paced at 800 requests/s per copy, {paced_n:,} requests",
        ["executor", "copies", "run s", "requests/s", "x one copy"],
        rows,
    )
    n = 100_000 if quick else 1_000_000
    big = write(tmp / "big.jsonl", echo_lines(n))
    fast = "engine_args: {max_in_flight: 1024}"
    rows = []
    for label, entry in (
        ("one local copy (the model process writes the log)", f"{{engine: echo, {fast}}}"),
        ("2 local copies (results through the daemon)", f"{{engine: echo, replicas: 2, {fast}}}"),
        ("4 Ray copies", f"{{engine: echo, replicas: 4, executor: ray, {fast}}}"),
    ):
        r = run_copies(tmp, label.split(" (")[0].replace(" ", "-"), entry, big)
        out[label] = r
        rows.append([label, r["run_s"], r["req_per_s"], r["daemon_peak_rss_mb"], 1e6 / r["req_per_s"]])
    table(
        f"7b. Transport, echo unpaced, {n:,} requests",
        ["runner", "run s", "requests/s", "daemon peak RSS MB", "us per request"],
        rows,
    )
    return out


# -- 3. crash cost ----------------------------------------------------------------------------------
def bench_crash(kills: int, tmp: Path) -> dict:
    from dropbox_runner.results.log import read_fed_mark, read_marker

    root = make_root(tmp / "crash", "settle_seconds: 0.2, commit_interval_ms: 200")
    (root / "inbox/paced").mkdir(parents=True)
    n = 60000
    write(
        root / "inbox/paced/c.jsonl",
        [
            json.dumps({"custom_id": f"r{i}", "url": "/v1/completions", "body": {"prompt": f"p {i}"}})
            for i in range(n)
        ],
    )
    # the real pace of this job on this machine, from an uninterrupted run of the same file
    ref = make_root(tmp / "crash-ref", "settle_seconds: 0.2, commit_interval_ms: 200")
    (ref / "inbox/paced").mkdir(parents=True)
    os.link(root / "inbox/paced/c.jsonl", ref / "inbox/paced/c.jsonl")
    subprocess.run(
        [PY, "-m", "dropbox_runner", "run", "--once", "--root", str(ref)], capture_output=True, check=True
    )
    marker = json.loads(next((ref / "state/archive").glob("*/paced.marker")).read_text())
    rate = n / (marker["updated_at"] - marker["started_at"])  # float times, unlike batch.json
    rng = random.Random(3)
    lost, t0 = [], time.time()
    for _ in range(kills):
        p = daemon(root)
        time.sleep(rng.uniform(1.0, 3.0))
        logs = list((root / "state/jobs").glob("*/paced.log"))
        p.send_signal(signal.SIGKILL)
        p.wait()
        time.sleep(0.3)  # the model process sees its daemon gone and dies
        if logs:
            m = read_marker(logs[0])
            lost.append(read_fed_mark(logs[0]) + 1 - (m.count if m else 0))
    p = daemon(root, "--once")
    p.wait()
    wall = time.time() - t0
    table(
        f"3. Crash cost: {kills} kill -9 of the daemon during a {n:,}-request job (echo, 5 ms per request, "
        "256 in flight, commit every 200 ms)",
        [
            "kills",
            "requests redone per crash (mean)",
            "max",
            "one commit interval of work (measured pace)",
            "total wall s",
        ],
        [[kills, statistics.mean(lost), max(lost), rate * 0.2, wall]],
    )
    return {"redone_per_crash": lost, "commit_interval_work": rate * 0.2, "wall_s": wall}


# -- 4. intake latency ------------------------------------------------------------------------------
def bench_intake(tmp: Path) -> dict:
    out, rows = {}, []
    for mode, args in (("inotify", []), ("polling", ["--poll", "--poll-interval", "0.25"])):
        root = make_root(tmp / f"intake-{mode}", "settle_seconds: 1.0")
        (root / "inbox/echo").mkdir(parents=True)
        p = daemon(root, *args)
        while not (root / "state/status.json").exists():
            time.sleep(0.05)
        lat = []
        for i in range(5):
            f = root / f"inbox/echo/f{i}.jsonl"
            f.write_text(
                json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}) + "\n"
            )
            t0 = time.time()
            while f.exists():
                time.sleep(0.005)
            lat.append(time.time() - t0)
        p.send_signal(signal.SIGTERM)
        p.wait()
        out[mode] = lat
        rows.append([mode, 1.0, statistics.mean(lat), max(lat)])
    table(
        "4. Intake latency: last write to claim (settle_seconds 1.0; target settle + 0.5 s)",
        ["watcher", "settle s", "mean s", "max s"],
        rows,
    )
    return out


# -- 5. swap ------------------------------------------------------------------------------------------
def bench_swap(tmp: Path) -> dict:
    # the shipped configuration of the tiny models (eager): what a swap costs in the demo and tests
    root = make_root(tmp / "swap", vllm_args=VLLM_ARGS.replace("}", ", enforce_eager: true}"))
    (root / "inbox").mkdir()
    write(root / "inbox/s.jsonl", chat_lines(200, 8))
    (root / "inbox/s.manifest.json").write_text(json.dumps({"models": ["tiny-llama", "tiny-qwen"]}))
    subprocess.run(
        [PY, "-m", "dropbox_runner", "run", "--once", "--root", str(root)],
        capture_output=True,
        env=ENV,
        check=True,
    )
    log = (root / "state/daemon.log").read_text()
    unload = [float(x) for x in re.findall(r"swap: ended \S+ \(pid \d+\) in ([\d.]+)s", log)]
    b = batch(root, "s")["models"]
    gap = b["tiny-qwen"]["started_at"] - b["tiny-llama"]["completed_at"]
    rows = [
        ["tiny-llama", "-", b["tiny-llama"]["load_seconds"]],
        ["tiny-qwen", unload[0] if unload else "-", b["tiny-qwen"]["load_seconds"]],
    ]
    table(
        "5. Swap (tiny models as shipped, enforce_eager): unload of the previous model, load of the next (s)",
        ["model", "unload s", "load s"],
        rows,
    )
    print(
        f"\ngap between the last result of tiny-llama and the first of tiny-qwen: {gap:.1f} s "
        f"(target: load {b['tiny-qwen']['load_seconds']:.1f} s + 1 s; whole seconds in batch.json)"
    )
    return {"unload_s": unload, "gap_s": gap, "loads": {m: b[m]["load_seconds"] for m in b}}


# -- 6. status with 1,000 jobs -----------------------------------------------------------------------
def bench_status(jobs: int, tmp: Path) -> dict:
    root = make_root(tmp / "status")
    (root / "inbox/echo").mkdir(parents=True)
    for i in range(jobs):
        write(
            root / f"inbox/echo/j{i:04d}.jsonl",
            [json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": f"x {i}"}})],
        )
    subprocess.run(
        [PY, "-m", "dropbox_runner", "run", "--once", "--root", str(root), "--settle", "0.1"],
        capture_output=True,
        env=ENV,
        check=True,
    )
    times = {}
    for args in ([], ["--all"], ["--json", "--all"]):
        t = []
        for _ in range(3):
            t0 = time.time()
            subprocess.run(
                [PY, "-m", "dropbox_runner", "status", "--root", str(root), *args],
                capture_output=True,
                check=True,
            )
            t.append(time.time() - t0)
        times[" ".join(args) or "(default)"] = min(t)
    table(
        f"6. `dropbox-runner status` with {jobs:,} finished jobs (whole command, best of 3; target < 0.3 s)",
        ["arguments", "seconds"],
        [[k, v] for k, v in times.items()],
    )
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="1,2,3,4,5,6,7,8,9,10")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs per compared pair")
    ap.add_argument("--models", default=",".join(RACE_MODELS), help="the models of the speed race")
    ap.add_argument("--scale", type=float, help="of section 9's line counts (default 1, 0.25 with --quick)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    for name in ("tiny-llama", "tiny-qwen", "smollm2"):  # built once, kept in models/
        if not (REPO / "models" / name / "config.json").exists():
            subprocess.run(
                [PY, "-m", "dropbox_runner.engine.tinymodels", str(REPO / "models"), name],
                capture_output=True,
                check=True,
            )
    print(
        f"# dropbox_runner benchmarks\n\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    results = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "1" in only:
            for model in args.models.split(","):
                n = RACE_MODELS[model][1]
                results[f"1-{model}"] = bench_race(model, n // 5 if args.quick else n, args.rounds, tmp)
        if "2" in only:
            results["2"] = bench_overhead([20000] if args.quick else [100000, 1000000], tmp)
        if "3" in only:
            results["3"] = bench_crash(3 if args.quick else 10, tmp)
        if "4" in only:
            results["4"] = bench_intake(tmp)
        if "5" in only:
            results["5"] = bench_swap(tmp)
        if "6" in only:
            results["6"] = bench_status(100 if args.quick else 1000, tmp)
        if "7" in only:
            results["7"] = bench_scaling(tmp, args.quick)
        if "8" in only:
            results["8"] = bench_prefix(tmp, args.quick, args.rounds)
        if "9" in only:  # issue 22's targets: noisy neighbours, preemption, memory, KV, the race's levers
            sys.path.insert(0, str(REPO / "bench"))
            from noisy import bench_noisy
            from race_levers import bench_levers
            from sharing_targets import bench_targets

            scale = args.scale if args.scale is not None else (0.25 if args.quick else 1.0)
            results["9"] = bench_noisy(tmp, scale, args.rounds)
            results["9-targets"] = bench_targets(tmp, scale, {"preempt", "memory", "kv"})
            n = RACE_MODELS["tiny-llama"][1]
            results["9-race"] = bench_levers(
                tmp, round(n * scale), args.rounds, ("generate-inproc", "d", "d8")
            )
        if "10" in only:
            from lorabench import bench_lora  # bench/ is this script's folder

            results["10"] = bench_lora(tmp, args.quick, REPO, PY, ENV, chat_lines, table)
    out = REPO / "bench/results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
