"""The model slot: one model process (or its copies) on the GPU, its supervision, crash policy,
memory guard and LoRA adapters."""
