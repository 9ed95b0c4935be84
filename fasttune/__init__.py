"""fasttune: fine-tune Qwen2.5 with Unsloth, ship it as a GGUF that llama.cpp runs offline.

Pipeline, one module per stage: data -> chat (template + mask) -> model (Unsloth load + LoRA)
-> train (TRL SFTTrainer) -> merge (adapter onto the 16-bit base) -> gguf (write + quantize)
-> infer (llama-cpp-python).
"""

import functools
import hashlib
import os
from pathlib import Path

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input or usage. Scripts print the message on one line and exit with code 2.

    The message must name what is wrong (file, line, field) and how to fix it.
    """


def cpu_threads() -> int:
    """The CPUs this process may use: its affinity mask (what `taskset` and cpusets narrow), capped by a
    cgroup CPU quota (docker --cpus, Kubernetes limits), or $FASTTUNE_THREADS. Not os.cpu_count(): in
    a 2-CPU container on a 64-core host that is 64, and 64 spinning llama.cpp threads on 2 CPUs decode
    many times slower."""
    if os.environ.get("FASTTUNE_THREADS"):
        if not os.environ["FASTTUNE_THREADS"].isdigit() or int(os.environ["FASTTUNE_THREADS"]) < 1:
            raise UserError(f"FASTTUNE_THREADS={os.environ['FASTTUNE_THREADS']!r}: expected a whole number >= 1")
        return int(os.environ["FASTTUNE_THREADS"])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()  # cgroup v2: "max 100000" when unlimited
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def free_accelerator_memory() -> None:
    """Hand back what a deleted model held: reference cycles (a trainer, Unsloth's patches) and the GPU
    memory torch keeps cached, which llama.cpp, loading next, cannot otherwise use."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cached_tokenizer(model_dir):
    """transformers' AutoTokenizer for `model_dir`, loaded once per process for as long as the folder's
    tokenizer files are unchanged: a Qwen tokenizer takes about a second to load, and one export reads
    the same one about ten times. Shared between callers, so none may modify it. Not a folder (a hub
    name): loaded each time, as transformers does."""
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if not folder.is_dir():
        return AutoTokenizer.from_pretrained(model_dir)
    return _tokenizer(folder.resolve(), _tokenizer_digest(folder))


# not read by a tokenizer; hashing them would cost seconds to minutes
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")


def _tokenizer_digest(folder: Path) -> str:
    """sha256 over the folder's files but its weights, and additional_chat_templates/ (transformers reads
    it): content, not timestamps, which a copy can keep and a rewrite within one clock tick does not move."""
    digest = hashlib.sha256()
    files = [*folder.iterdir(), *(folder / "additional_chat_templates").glob("*")]
    for path in sorted(p for p in files if p.is_file() and not p.name.endswith(WEIGHTS)):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: Path, digest: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
