"""The memory guard: will a model fit, judged before loading it, from safetensors headers alone.

GPU memory from nvidia-smi when there is one; otherwise the CPU build's RAM (/proc/meminfo).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "BOOL": 1,
}
TARGET_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
RUNTIME_OVERHEAD = 1 * GIB  # the engine's own buffers and activations, beside weights and KV cache


def weight_bytes(folder: Path, dtype: str | None = None) -> int:
    """Bytes of the weights once loaded in `dtype` (as stored when auto), read from the headers only."""
    total = 0
    target = TARGET_BYTES.get(str(dtype or "auto").lower())
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key == "__metadata__":
                continue
            stored = t["data_offsets"][1] - t["data_offsets"][0]
            size = DTYPE_BYTES.get(t.get("dtype", ""), 0)
            total += (
                stored * target // size if target and size and t["dtype"].startswith(("F", "BF")) else stored
            )
    return total


@dataclass
class Device:
    kind: str  # "gpu" | "cpu"
    free: int
    total: int


def device() -> Device:
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split("\n")[0]
            free, total = (int(x) * 1024**2 for x in out.split(","))
            return Device("gpu", free, total)
        except (subprocess.SubprocessError, ValueError, OSError):
            pass
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        info[key] = int(rest.split()[0]) * 1024
    return Device("cpu", info.get("MemAvailable", 0), info.get("MemTotal", 0))


def fit_problem(name: str, folder: Path, engine_args: dict, dev: Device | None = None) -> str | None:
    """A sentence with both numbers and what to change if the model cannot fit, else None."""
    if not folder.is_dir():
        return None
    weights = weight_bytes(folder, engine_args.get("dtype"))
    if not weights:
        return None
    dev = dev or device()
    util = float(engine_args.get("gpu_memory_utilization", 0.9 if dev.kind == "gpu" else 0.3))
    if dev.kind == "gpu":
        budget = min(dev.free, util * dev.total)
        need = weights + RUNTIME_OVERHEAD
    else:
        budget = dev.free
        need = max(weights + RUNTIME_OVERHEAD, util * dev.total)
    if need <= budget:
        return None
    where = "GPU memory" if dev.kind == "gpu" else "RAM"
    return (
        f"{name} needs about {need / GIB:.1f} GiB ({weights / GIB:.1f} GiB of weights) but only "
        f"{budget / GIB:.1f} GiB of {where} is available; use a smaller dtype (bfloat16), a lower "
        f"max_model_len or gpu_memory_utilization, or a smaller model"
    )


def is_memory_failure(reason: str) -> bool:
    r = reason.lower()
    return (
        "out of memory" in r or "not enough memory" in r or "insufficient memory" in r or "oom" in r.split()
    )
