"""dropbox_runner: a crash-safe, folder-driven batch runner around vLLM.

Drop OpenAI Batch JSONL files into `inbox/`, get aligned results in `outbox/`.
"""

__version__ = "0.1.0"
