"""Print what the demo produced: SmolLM2's answers, and the two models of compare.jsonl side by side."""

import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")


def text(line: dict) -> str:
    response = line.get("response") or {}
    body = response.get("body") or {}
    if response.get("status_code") != 200:
        return f"(error: {(body.get('error') or line.get('error') or {}).get('message')})"
    if body.get("object") == "response":
        return body["output"][0]["content"][0]["text"]
    return body["choices"][0]["message"]["content"]


questions = root / "outbox/questions/smollm2.jsonl"
if questions.exists():
    print("SmolLM2-135M-Instruct (outbox/questions/smollm2.jsonl):")
    for line in map(json.loads, questions.read_text().splitlines()):
        print(f"  {line['custom_id']:<12} {' '.join(text(line).split())[:150]}")
compare = root / "outbox/compare/compare.jsonl"
if compare.exists():
    print("\nA real model beside a random-weight one (outbox/compare/compare.jsonl):")
    for line in list(map(json.loads, compare.read_text().splitlines()))[:3]:
        for model, answer in line["answers"].items():
            shown = answer.get("text") or answer.get("error") or ""
            print(f"  {line['custom_id']:<7} {model:<11} {' '.join(str(shown).split())[:110]!r}")
fine_tunes = root / "outbox/fine-tunes/compare.jsonl"
if fine_tunes.exists():
    print("\nSmolLM2 beside two LoRA adapters of it, one load (outbox/fine-tunes/compare.jsonl):")
    for line in list(map(json.loads, fine_tunes.read_text().splitlines()))[:4]:
        for model, answer in line["answers"].items():
            shown = answer.get("text") or answer.get("error") or ""
            print(f"  {line['custom_id']:<6} {model:<15} {' '.join(str(shown).split())[:100]!r}")
