"""fasttune: fine-tune Qwen2.5 with Unsloth, ship it as a GGUF that llama.cpp runs offline.

Pipeline, one module per stage: data -> chat (template + mask) -> model (Unsloth load + LoRA)
-> train (TRL SFTTrainer) -> merge (adapter onto the 16-bit base) -> gguf (write + quantize)
-> infer (llama-cpp-python).
"""

import os

__version__ = "0.1.0"


def cpu_threads() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and `taskset` narrow), or
    $FASTTUNE_THREADS. Not os.cpu_count(): on a 2-CPU container of a 64-core host that is 64, and
    llama.cpp's 64 spinning threads on 2 CPUs decode many times slower."""
    if os.environ.get("FASTTUNE_THREADS"):
        return max(1, int(os.environ["FASTTUNE_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class UserError(Exception):
    """Bad input or usage. Scripts print the message on one line and exit with code 2.

    The message must name what is wrong (file, line, field) and how to fix it.
    """
