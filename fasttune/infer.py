"""Run a GGUF through llama-cpp-python: load it, chat with it (the template embedded in the file).

llama-cpp-python builds its chat formatter from the GGUF's `tokenizer.chat_template` and stops at
the file's end-of-generation tokens (<|im_end|>), so what runs here is what a llama.cpp user gets.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from fasttune import UserError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def load(path: str | Path, n_ctx: int = 4096, **kwargs):
    """A llama_cpp.Llama for the file, closed on exit (an unclosed one errors at interpreter exit)."""
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    kwargs.setdefault("n_threads", os.cpu_count())
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, **kwargs)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise UserError(f"{path}: llama.cpp cannot load this file ({e}); re-export it") from None
    try:
        yield llm
    finally:
        llm.close()


def chat(llm, messages: list[dict], max_tokens: int = 256, stream: bool = False, **sampling):
    """One assistant turn; greedy unless sampling args say otherwise. Returns the OpenAI-style dict
    (or the chunk iterator when stream=True)."""
    sampling.setdefault("temperature", 0.0)
    return llm.create_chat_completion(messages=messages, max_tokens=max_tokens, stream=stream, **sampling)
