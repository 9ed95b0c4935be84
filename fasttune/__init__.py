"""fasttune: fine-tune Qwen2.5 with Unsloth, ship it as a GGUF that llama.cpp runs offline.

Pipeline, one module per stage: data -> chat (template + mask) -> model (Unsloth load + LoRA)
-> train (TRL SFTTrainer) -> merge (adapter onto the 16-bit base) -> gguf (write + quantize)
-> infer (llama-cpp-python).
"""

__version__ = "0.1.0"


class UserError(Exception):
    """Bad input or usage. Scripts print the message on one line and exit with code 2.

    The message must name what is wrong (file, line, field) and how to fix it.
    """
