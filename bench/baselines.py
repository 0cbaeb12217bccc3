"""The simple scripts people write, for the throughput benchmark: run as separate processes.

`python bench/baselines.py generate|chunked MODEL_DIR INPUT OUTPUT ENGINE_ARGS_JSON` prints one JSON
line of timings. Chat templates are rendered before the clock of generation starts, as such a
script does; each line's own max_tokens is honoured.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    mode, model, inp, out, engine_args = sys.argv[1:6]
    t0 = time.time()
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **json.loads(engine_args))
    t_loaded = time.time()
    tok = llm.get_tokenizer()
    lines = [json.loads(x) for x in open(inp)]
    prompts = [
        tok.apply_chat_template(x["body"]["messages"], add_generation_prompt=True, tokenize=False)
        for x in lines
    ]
    params = [
        SamplingParams(max_tokens=x["body"]["max_tokens"], temperature=0, ignore_eos=True) for x in lines
    ]
    tokens = 0
    t_gen = time.time()
    if mode == "generate":  # (a) one big generate(), results written at the end
        outs = llm.generate(prompts, params, use_tqdm=False)
        with open(out, "w") as f:
            for x, o in zip(lines, outs, strict=True):
                tokens += len(o.outputs[0].token_ids)
                f.write(json.dumps({"custom_id": x["custom_id"], "text": o.outputs[0].text}) + "\n")
    else:  # (b) chunks of 100, saved and fsynced after each: hand-written checkpointing
        with open(out, "w") as f:
            for i in range(0, len(prompts), 100):
                outs = llm.generate(prompts[i : i + 100], params[i : i + 100], use_tqdm=False)
                for x, o in zip(lines[i : i + 100], outs, strict=True):
                    tokens += len(o.outputs[0].token_ids)
                    f.write(json.dumps({"custom_id": x["custom_id"], "text": o.outputs[0].text}) + "\n")
                f.flush()
                os.fsync(f.fileno())
    t_end = time.time()
    print(
        json.dumps({"load_s": t_loaded - t0, "gen_s": t_end - t_gen, "tokens": tokens, "wall_s": t_end - t0})
    )
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
