"""Bench section 9 (issue 24): a base and three LoRA adapters in one manifest, against four full models.

The adapters are random rank-8 LoRAs of tiny-llama (tinymodels.random_lora); the full models are
the same adapters merged into copies of tiny-llama with peft, for this comparison only (the runner
itself never merges). All eager. Also: the base's own rate with adapters declared and without.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

ARGS = "{dtype: float32, max_model_len: 512, gpu_memory_utilization: 0.15, enforce_eager: true}"
ADAPTERS = ("lora1", "lora2", "lora3")


def merged_copy(base: Path, adapter: Path, out: Path) -> Path:
    """The adapter merged into a full copy of its base (tokenizer files copied beside it)."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def run_manifest(
    root: Path, entries: dict[str, str], models: list[str], lines: list[str], py: str, env
) -> dict:
    """One `run --once` of a manifest over `models`: wall clock, loads, tok/s of each model's task."""
    (root / "inbox").mkdir(parents=True)
    body = "\n".join(f"  {name}: {entry}" for name, entry in entries.items())
    (root / "models.yaml").write_text(f"settings: {{settle_seconds: 0.2}}\nmodels:\n{body}\n")
    (root / "inbox/m.jsonl").write_text("\n".join(lines) + "\n")
    (root / "inbox/m.manifest.json").write_text(json.dumps({"models": models}))
    t0 = time.monotonic()
    subprocess.run(
        [py, "-m", "dropbox_runner", "run", "--once", "--root", str(root)],
        env=env,
        check=True,
        capture_output=True,
    )
    wall = time.monotonic() - t0
    log = (root / "state/daemon.log").read_text()
    rates = {}
    for m in models:
        marker = json.loads(next((root / "state").rglob(f"batch_*/{m}.marker")).read_text())
        rates[m] = marker["completion_tokens"] / max(1e-9, marker["updated_at"] - marker["started_at"])
    return {"wall_s": wall, "loads": len(re.findall(r"INFO loading ", log)), "tok_s": rates}


def bench_lora(tmp: Path, quick: bool, repo: Path, py: str, env, chat_lines, table) -> dict:
    from dropbox_runner.engine import tinymodels

    base = repo / "models/tiny-llama"
    n = 200 if quick else 2000
    folders = {
        a: tinymodels.random_lora(base, tmp / "lora/adapters" / a, seed) for seed, a in enumerate(ADAPTERS, 1)
    }
    full = {a: merged_copy(base, folders[a], tmp / "lora/merged" / a) for a in ADAPTERS}
    lines = chat_lines(n, 32)
    base_entry = f"{{path: {base}, engine_args: {ARGS}, defaults: {{temperature: 0}}}}"
    models = ["tiny-llama", *ADAPTERS]
    adapters = run_manifest(
        tmp / "lora/adapters-root",
        {"tiny-llama": base_entry, **{a: f"{{base: tiny-llama, adapter: {folders[a]}}}" for a in ADAPTERS}},
        models,
        lines,
        py,
        env,
    )
    merged = run_manifest(
        tmp / "lora/merged-root",
        {
            "tiny-llama": base_entry,
            **{
                a: f"{{path: {full[a]}, engine_args: {ARGS}, defaults: {{temperature: 0}}}}" for a in ADAPTERS
            },
        },
        models,
        lines,
        py,
        env,
    )
    alone = run_manifest(tmp / "lora/alone-root", {"tiny-llama": base_entry}, ["tiny-llama"], lines, py, env)
    rows = [
        [
            "base + 3 adapters, one manifest",
            adapters["wall_s"],
            adapters["loads"],
            *[adapters["tok_s"][m] for m in models],
        ],
        [
            "4 full models (adapters merged)",
            merged["wall_s"],
            merged["loads"],
            *[merged["tok_s"][m] for m in models],
        ],
        [
            "the base alone, no adapter declared",
            alone["wall_s"],
            alone["loads"],
            alone["tok_s"]["tiny-llama"],
            "-",
            "-",
            "-",
        ],
    ]
    table(
        f"9. LoRA adapters: tiny-llama and 3 rank-8 adapters, {n:,} lines each, eager "
        "(target: >= 2x faster end to end, 1 load; adapters within 25 % of the base)",
        ["run", "wall s", "loads", "base tok/s", *[f"{a} tok/s" for a in ADAPTERS]],
        rows,
    )
    base_rate = adapters["tok_s"]["tiny-llama"]
    each = ", ".join(f"{adapters['tok_s'][a] / base_rate:.2f}" for a in ADAPTERS)
    print(
        f"\nend to end: {merged['wall_s'] / adapters['wall_s']:.2f}x faster with adapters; each adapter's rate "
        f"against the base's in that run: {each}; the base's own rate with adapters declared against "
        f"without: {base_rate / alone['tok_s']['tiny-llama']:.2f}"
    )
    return {"adapters": adapters, "merged": merged, "alone": alone}
