"""LoRA adapters on the echo engine: served by their base's process, one load, failing alone, crash-safe,
deduped by their weights (CONTRACT section 13). The real vLLM's side is in test_vllm_lora.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner

from dropbox_runner.cli import main
from dropbox_runner.config import parse_registry
from dropbox_runner.errors import ConfigError
from dropbox_runner.queue.keys import QueueKey
from dropbox_runner.queue.scheduler import pick
from dropbox_runner.results.log import read_fed_mark
from dropbox_runner.slot import adapters, loadable

from helpers import batch_json, chat_line, finished, models_yaml, read_jsonl, run_once, wait_for, write_jsonl
from lora_kit import fake_adapter

LORA_YAML = """
settings: {settle_seconds: 0.2, rescan_seconds: 5, commit_interval_ms: 50, manifest_grace_seconds: 1}
models:
  base: {engine: echo, engine_args: {delay_ms: 2, max_in_flight: 16}, defaults: {max_tokens: 3}}
  sql: {base: base, adapter: adapters/sql, defaults: {max_tokens: 4}}
  chat: {base: base, adapter: adapters/chat}
  other: {engine: echo}
"""


@pytest.fixture
def lroot(root: Path) -> Path:
    models_yaml(root, text=LORA_YAML)
    fake_adapter(root / "adapters/sql")
    fake_adapter(root / "adapters/chat", rank=16)
    return root


def manifest(root: Path, name: str, models: list[str], lines: list[dict]) -> None:
    write_jsonl(root / f"inbox/{name}.jsonl", lines)
    (root / f"inbox/{name}.manifest.json").write_text(json.dumps({"models": models}))


def test_a_manifest_of_base_and_two_adapters_loads_once_and_aligns(lroot: Path) -> None:
    manifest(lroot, "cmp", ["base", "sql", "chat"], [chat_line(i) for i in range(40)])
    proc = run_once(lroot)
    assert proc.stderr.count("loading base") == 1, proc.stderr[-3000:]
    assert "loading sql" not in proc.stderr and "loading chat" not in proc.stderr
    assert "swap:" not in proc.stderr, "the adapters' tasks ran in the base's process"
    outs = {m: read_jsonl(lroot / f"outbox/cmp/{m}.jsonl") for m in ("base", "sql", "chat")}
    for m, lines in outs.items():
        assert [x["custom_id"] for x in lines] == [f"q-{i}" for i in range(40)]
        assert {x["response"]["body"]["model"] for x in lines} == {m}, "the body names the adapter"
    first = {m: lines[0]["response"]["body"]["choices"][0]["message"]["content"] for m, lines in outs.items()}
    # the base's defaults (max_tokens 3) apply to an adapter, and an adapter's own win over them
    assert first == {
        "base": "echo: question number",
        "sql": "echo[sql]: question number 0",
        "chat": "echo[chat]: question number",
    }
    compare = read_jsonl(lroot / "outbox/cmp/compare.jsonl")
    assert compare[0]["answers"] == {m: {"text": t} for m, t in first.items()}
    batch = batch_json(lroot, "cmp")
    assert batch["status"] == "completed" and list(batch["models"]) == ["base", "sql", "chat"]
    queued = [json.loads(p.read_text())["model"] for p in sorted((lroot / "state").rglob("*.task.json"))]
    assert sorted(queued) == ["base", "chat", "sql"]


def test_an_adapters_own_folder_in_the_inbox_runs_it(lroot: Path) -> None:
    write_jsonl(lroot / "inbox/sql/one.jsonl", [chat_line(0)])
    proc = run_once(lroot)
    body = read_jsonl(lroot / "outbox/one/sql.jsonl")[0]["response"]["body"]
    assert body["model"] == "sql" and body["choices"][0]["message"]["content"].startswith("echo[sql]:")
    assert "loading base" in proc.stderr


def test_a_bad_adapter_fails_its_own_tasks_and_the_rest_run(lroot: Path) -> None:
    text = (
        LORA_YAML
        + "  ghost: {base: base, adapter: adapters/missing}\n  huge: {base: base, adapter: adapters/huge}\n"
    )
    models_yaml(lroot, text=text)
    fake_adapter(lroot / "adapters/huge", rank=1024)
    manifest(lroot, "mix", ["base", "ghost", "sql", "huge"], [chat_line(i) for i in range(10)])
    proc = run_once(lroot)
    batch = batch_json(lroot, "mix")
    assert batch["models"]["base"]["status"] == batch["models"]["sql"]["status"] == "completed"
    assert batch["models"]["ghost"]["status"] == "failed"
    assert "adapters/missing does not exist" in batch["models"]["ghost"]["error"]
    assert "rank 1024" in batch["models"]["huge"]["error"]
    assert len(read_jsonl(lroot / "outbox/mix/sql.jsonl")) == 10
    assert proc.stderr.count("loading base") == 1


def fed(root: Path, model: str) -> int:
    log = next((root / "state/jobs").glob(f"*/{model}.log"), None)
    return read_fed_mark(log) if log is not None else 0


def test_the_model_process_killed_mid_job_with_adapters_resumes_with_nothing_lost(
    lroot: Path, daemon
) -> None:
    lines = [chat_line(i) for i in range(1500)]
    manifest(lroot, "crash", ["base", "sql", "chat"], lines)
    d = daemon(lroot)
    try:
        for model in ("sql", "chat"):  # once in each adapter's task, past its first commits
            wait_for(lambda m=model: fed(lroot, m) > 100, what=f"{model} running")
            pid = json.loads((lroot / "state/status.json").read_text())["model_pid"]
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda p=pid: (
                    json.loads((lroot / "state/status.json").read_text())["model_pid"] not in (p, None)
                ),
                what="restart",
            )
        wait_for(lambda: finished(lroot, "crash"), timeout=180, what="job end")
    finally:
        d.kill(signal.SIGTERM)
    assert d.output().count("killed by SIGKILL") >= 2  # a line per task the process held (they share)
    for model in ("base", "sql", "chat"):
        out = read_jsonl(lroot / f"outbox/crash/{model}.jsonl")
        assert [x["custom_id"] for x in out] == [f"q-{i}" for i in range(1500)], model
        assert all(x["response"]["body"]["model"] == model for x in out)
    sql = [
        x["response"]["body"]["choices"][0]["message"]["content"]
        for x in read_jsonl(lroot / "outbox/crash/sql.jsonl")
    ]
    assert sql == [f"echo[sql]: question number {i}" for i in range(1500)], "each line answered once, by sql"
    assert batch_json(lroot, "crash")["request_counts"] == {"total": 4500, "completed": 4500, "failed": 0}


def test_dedupe_runs_an_adapter_again_when_its_weights_change(lroot: Path) -> None:
    lines = [chat_line(i) for i in range(5)]
    for _ in range(2):
        write_jsonl(lroot / "inbox/sql/same.jsonl", lines)
        run_once(lroot)
    assert batch_json(lroot, "same.2")["dedupe_of"] == batch_json(lroot, "same")["id"]
    fake_adapter(lroot / "adapters/sql", weights=b"retrained")
    write_jsonl(lroot / "inbox/sql/same.jsonl", lines)
    proc = run_once(lroot)
    assert "byte-identical" not in proc.stderr and "loading base" in proc.stderr
    assert batch_json(lroot, "same.3").get("dedupe_of") is None
    assert batch_json(lroot, "same.3")["status"] == "completed"


def key(rank: int, created_ns: int, job_id: str, model: str) -> str:
    """A queue entry's name, as the journal writes it."""
    return str(QueueKey(rank, created_ns, job_id, model))


def test_an_adapter_never_swaps_out_its_own_base() -> None:
    queue = [(key(5, 1000, "a", "other"), "a", "other"), (key(5, 2000, "b", "sql"), "b", "sql")]
    base_of = {"sql": "base"}.get
    choice = pick(queue, "base", 600, now=1.5, base_of=lambda m: base_of(m, m))
    assert choice.model == "sql" and "base is loaded" in choice.reason
    assert pick(queue, "base", 600, now=1.5).model == "other", "without the mapping sql is another model"


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ("{base: base}", "x.adapter"),
        ("{adapter: a}", "x.base"),
        ("{base: base, adapter: a, path: p}", "x.path"),
        ("{base: base, adapter: a, engine_args: {dtype: float32}}", "x.engine_args"),
        ("{base: base, adapter: a, defaults: {temperature: hot}}", "x.defaults"),
    ],
)
def test_an_adapter_entry_written_wrong_is_an_error_of_the_file(entry: str, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"models\.{key}"):
        parse_registry(f"models:\n  base: {{engine: echo}}\n  x: {entry}\n", tmp_path)


def test_adapter_checks_name_the_base_the_folder_and_the_rank(tmp_path: Path) -> None:
    fake_adapter(tmp_path / "ok", rank=12)
    fake_adapter(tmp_path / "big", rank=600)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights/adapter_config.json").write_text('{"r": 8}')
    fake_adapter(tmp_path / "badjson")
    (tmp_path / "badjson/adapter_config.json").write_text("{")
    reg = parse_registry(
        """
models:
  base: {engine: echo}
  emb: {engine: echo, task: embed}
  ok: {base: base, adapter: ok}
  ok2: {base: base, adapter: ok}
  big: {base: base, adapter: big}
  nobase: {base: ghost, adapter: ok}
  onembed: {base: emb, adapter: ok}
  onadapter: {base: ok, adapter: ok}
  noweights: {base: base, adapter: noweights}
  badjson: {base: base, adapter: badjson}
""",
        tmp_path,
    )
    problems = {
        name: loadable.adapter_problem(tmp_path, reg, name) for name in reg.models if reg.models[name].base
    }
    assert problems["ok"] is None
    assert "rank 600" in problems["big"]
    assert "'ghost' is not a model" in problems["nobase"]
    assert "not a generation model" in problems["onembed"]
    assert "itself an adapter" in problems["onadapter"]
    assert "no adapter weights" in problems["noweights"]
    assert "cannot be read as JSON" in problems["badjson"]
    served = adapters.serving_config(tmp_path, reg, "base")
    assert set(served.lora_adapters) == {"ok", "ok2"}, "only the adapters that can run"
    assert "enable_lora" not in served.engine_args, "an echo base takes no vLLM arguments"
    vllm = reg.models["base"].model_copy(update={"engine": "vllm"})
    reg.models["base"] = vllm
    args = adapters.serving_config(tmp_path, reg, "base").engine_args
    assert args == {"enable_lora": True, "max_loras": 2, "max_lora_rank": 16}, "16: vLLM's size holding 12"
    assert adapters.lora_rank_for(8) == 8 and adapters.lora_rank_for(321) == 512


def test_models_check_names_a_bad_adapter(lroot: Path) -> None:
    models_yaml(lroot, text=LORA_YAML, models={"ghost": "{base: base, adapter: adapters/missing}"})
    result = CliRunner().invoke(main, ["models", "--check", "--root", str(lroot)])
    assert result.exit_code == 1
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "LoRA adapter of base" in lines["sql"] and lines["sql"].endswith("ok")
    assert "FAIL" in lines["ghost"] and "does not exist" in lines["ghost"]
    assert "FAIL" not in lines["base"]


def test_an_adapter_made_after_its_base_started_restarts_the_base_for_it(lroot: Path, daemon) -> None:
    import shutil

    shutil.rmtree(lroot / "adapters/chat")
    d = daemon(lroot)
    try:
        write_jsonl(lroot / "inbox/base/first.jsonl", [chat_line(0)])
        wait_for(lambda: finished(lroot, "first"), what="the base's job")
        fake_adapter(lroot / "adapters/chat")
        write_jsonl(lroot / "inbox/chat/second.jsonl", [chat_line(0)])
        wait_for(lambda: finished(lroot, "second"), what="the adapter's job")
    finally:
        d.kill(signal.SIGTERM)
    body = read_jsonl(lroot / "outbox/second/chat.jsonl")[0]["response"]["body"]
    assert body["choices"][0]["message"]["content"] == "echo[chat]: question number"
    assert d.output().count("loading base") == 2


def gate_the_base(root: Path) -> Path:
    """The base's lines that say GATE wait for the returned file (conftest's gate, on this root's base)."""
    gate = root / "gate.open"
    yaml = LORA_YAML.replace(
        "engine_args: {delay_ms: 2, max_in_flight: 16}",
        f"engine_args: {{delay_ms: 2, max_in_flight: 16, gate_on: GATE, gate_file: {gate}}}",
    )
    models_yaml(root, text=yaml)
    return gate


def test_adapters_share_the_bases_process_at_once_and_the_base_takes_its_turn(lroot: Path, daemon) -> None:
    """Sections 12 and 13: two adapters' jobs run at once in the base's process; the base's own job
    waits for them (base and adapters never share an engine step: docs/lora.md) and runs in the same
    process, with no reload."""
    gate = gate_the_base(lroot)
    for m in ("base", "sql", "chat"):
        (lroot / f"inbox/{m}").mkdir(exist_ok=True)
    write_jsonl(lroot / "inbox/sql/long.jsonl", [chat_line(i) for i in range(50)] + [chat_line(50, "GATE")])
    d = daemon(lroot)
    try:
        wait_for(lambda: (batch_json(lroot, "long") or {}).get("status") == "in_progress", what="sql running")
        write_jsonl(lroot / "inbox/chat/quick.jsonl", [chat_line(i) for i in range(20)])
        wait_for(lambda: finished(lroot, "quick"), what="the other adapter's job, while the first runs")
        write_jsonl(lroot / "inbox/base/own.jsonl", [chat_line(i) for i in range(20)])
        wait_for(lambda: batch_json(lroot, "own"), what="the base's job queued")
        assert not finished(lroot, "own") and not finished(lroot, "long")
        gate.touch()
        wait_for(lambda: finished(lroot, "long") and finished(lroot, "own"), what="both once released")
    finally:
        d.kill(signal.SIGTERM)
    log = (lroot / "state/daemon.log").read_text()
    assert log.count("loading base") == 1 and "swap:" not in log
    out = read_jsonl(lroot / "outbox/quick/chat.jsonl")
    assert {x["response"]["body"]["model"] for x in out} == {"chat"}
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"].startswith("echo[chat]:")
    own = read_jsonl(lroot / "outbox/own/base.jsonl")
    assert own[0]["response"]["body"]["choices"][0]["message"]["content"].startswith("echo: ")
    assert (
        batch_json(lroot, "own")["models"]["base"]["started_at"] >= batch_json(lroot, "long")["completed_at"]
    )


def test_base_and_adapter_tasks_take_turns_in_admission() -> None:
    from dropbox_runner.queue.scheduler import Held, admission

    base_of = {"sql": "base", "chat": "base"}.get
    queued = [
        (key(0, 2000000000, "j2", "base"), "j2", "base"),
        (key(0, 3000000000, "j3", "chat"), "j3", "chat"),
    ]
    kw = dict(max_shared=8, max_delay=600, preempt_after=None, loaded_for=0, runnable={"base"}, now=10)
    held = [Held(key(0, 1000000000, "j1", "sql"), "j1/sql", "a")]
    got = admission(queued, held, "base", {}, base_of=lambda m: base_of(m) or m, **kw)
    assert got.admit is None and "take turns" in got.reason  # the base's task is first: it waits
    got = admission(queued[1:], held, "base", {}, base_of=lambda m: base_of(m) or m, **kw)
    assert got.admit is not None and got.admit.model == "chat"  # adapters share


def test_cancel_of_a_job_whose_adapter_tasks_run_at_once_ends_both(lroot: Path, daemon) -> None:
    gate_the_base(lroot)  # the job cannot end before its cancel
    manifest(lroot, "j", ["sql", "chat"], [chat_line(i) for i in range(5)] + [chat_line(5, "GATE")])
    d = daemon(lroot)
    try:
        both = lambda: len((json.loads((lroot / "state/status.json").read_text()) or {}).get("running") or [])  # noqa: E731
        wait_for(lambda: (lroot / "state/status.json").exists() and both() == 2, what="both tasks running")
        assert CliRunner().invoke(main, ["cancel", "j"]).exit_code == 0
        wait_for(lambda: finished(lroot, "j"), what="the job cancelled")
    finally:
        d.kill(signal.SIGTERM)
    batch = batch_json(lroot, "j")
    assert batch["status"] == "cancelled"
    assert {m: batch["models"][m]["status"] for m in ("sql", "chat")} == {
        "sql": "cancelled",
        "chat": "cancelled",
    }
