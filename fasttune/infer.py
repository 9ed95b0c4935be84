"""Run a GGUF through llama-cpp-python: load it, chat with it (the template embedded in the file).

llama-cpp-python builds its chat formatter from the GGUF's `tokenizer.chat_template` and stops at
the file's end-of-generation tokens (<|im_end|>), so what runs here is what a llama.cpp user gets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path

from fasttune import UserError, cpu_threads

logger = logging.getLogger(__name__)


def gpu_layers(supports_offload: bool | None = None) -> int:
    """How many layers llama.cpp puts on the GPU: all (-1) when llama-cpp-python was built with a GPU
    backend (`make install` builds CUDA where nvcc is), none (0) otherwise; $FASTTUNE_GPU_LAYERS sets
    the number (0: the CPU, e.g. while the GPU trains). supports_offload: the build's answer (tests)."""
    value = os.environ.get("FASTTUNE_GPU_LAYERS")
    if value:
        if not re.fullmatch(r"-1|\d+", value):
            raise UserError(f"FASTTUNE_GPU_LAYERS={value!r}: expected a whole number of layers, or -1 for all")
        return int(value)
    if supports_offload is None:
        import llama_cpp

        supports_offload = bool(llama_cpp.llama_supports_gpu_offload())
    return -1 if supports_offload else 0


def original_context(metadata: dict) -> int | None:
    """The context a long-context rope extends (Phi-3's longrope: 4,096), from a GGUF's key/values."""
    value = metadata.get(f"{metadata.get('general.architecture')}.rope.scaling.original_context_length")
    return int(value) if value else None


def context_warning(name: str, n_ctx: int, metadata: dict) -> str | None:
    """What goes wrong with a context past the one a long-context rope extends, or None."""
    original = original_context(metadata)
    if not original or n_ctx <= original:
        return None
    return (f"{name}: a {n_ctx}-token context is past the model's original {original}: llama.cpp then applies the "
            f"long-context rope factors to every token, where transformers (and training) apply them only to "
            f"sequences longer than {original}, so answers differ from the merged model's; ask for a context of "
            f"{original} or less unless the conversations need more")


@contextlib.contextmanager
def load(path: str | Path, n_ctx: int = 4096, **kwargs):
    """A llama_cpp.Llama for the file, closed on exit (an unclosed one errors at interpreter exit)."""
    from llama_cpp import Llama

    path = Path(path)
    check_runnable(path)
    kwargs.setdefault("n_threads", cpu_threads())
    kwargs.setdefault("n_threads_batch", cpu_threads())  # prompts and eval; llama-cpp-python's default: every host core
    kwargs.setdefault("n_gpu_layers", gpu_layers())
    # llama.cpp pads the context to a multiple of 256 but llama-cpp-python 0.3.36 sizes its token
    # buffer to the number asked for, and overflows it past that: ask for the padded size.
    n_ctx = -(-n_ctx // 256) * 256
    if layers := kwargs["n_gpu_layers"]:
        logger.info("%s: %s layers on the GPU", path.name, "all" if layers == -1 else layers)
    try:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False, **kwargs)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        hint = (" or, if the GPU is out of memory, run it on the CPU: FASTTUNE_GPU_LAYERS=0"
                if kwargs["n_gpu_layers"] else "")
        raise UserError(f"{path}: llama.cpp cannot load this file ({e}); re-export it{hint}") from None
    if warning := context_warning(path.name, llm.n_ctx(), llm.metadata):
        logger.warning(warning)
    try:
        yield llm
    finally:
        llm.close()


def check_runnable(path: Path) -> None:
    """Refuse, with the fix, what would crash llama.cpp instead of running: a missing file, or a quantized
    file under a llama-cpp-python built with llama.cpp's AMX kernels, which in this release segfault on
    every quantized type (llama.cpp issue 20824; `make install` builds without them)."""
    import llama_cpp

    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return
    try:  # the header only: vocab_only loads no weights
        header = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except ValueError as e:
        raise UserError(f"{path}: llama.cpp cannot load this file ({e}); re-export it") from None
    file_type = header.metadata.get("general.file_type")
    header.close()
    sixteen_bit = (llama_cpp.LLAMA_FTYPE_ALL_F32, llama_cpp.LLAMA_FTYPE_MOSTLY_F16, llama_cpp.LLAMA_FTYPE_MOSTLY_BF16)
    if file_type is None or int(file_type) not in sixteen_bit:
        raise UserError(f"{path}: this llama-cpp-python was built with llama.cpp's AMX kernels, which crash on "
                        "quantized files; rebuild it without them: `make install` in a fresh .venv, or "
                        "CMAKE_ARGS='-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8' pip install "
                        "--force-reinstall --no-cache-dir --no-deps llama-cpp-python==0.3.36")


def chat(llm, messages: list[dict], max_tokens: int = 256, stream: bool = False, **sampling):
    """One assistant turn; greedy unless sampling args say otherwise. Returns the OpenAI-style dict
    (or the chunk iterator when stream=True)."""
    sampling.setdefault("temperature", 0.0)
    return llm.create_chat_completion(messages=messages, max_tokens=max_tokens, stream=stream, **sampling)


def bits_per_weight(llm, extra_bytes: int = 0) -> float:
    """Tensor bytes x 8 / parameters of the loaded file: what a quant really costs (k-quants fall back
    to larger types for rows that are not a multiple of 256 wide, e.g. Qwen2.5-0.5B's 896).
    extra_bytes: a LoRA adapter applied at load time, counted against the base model's parameters."""
    import llama_cpp

    return 8 * (llama_cpp.llama_model_size(llm.model) + extra_bytes) / llama_cpp.llama_model_n_params(llm.model)


def model_name(path: Path, adapter: Path | None = None) -> str:
    """How a GGUF file, or a base file with a LoRA adapter applied at load time, is named in every report."""
    return Path(path).name + (f" + {Path(adapter).name}" if adapter else "")


def prompt_tokens(llm, messages: list[dict]) -> int:
    """How many tokens `messages` take once the file's chat template has rendered them (with the
    assistant cue): what must fit in the context window together with the answer."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    token_text = lambda t: llm.detokenize([t], special=True).decode(errors="replace")  # noqa: E731
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                    eos_token=token_text(llm.token_eos()), bos_token=token_text(llm.token_bos()))
    prompt = formatter(messages=messages).prompt
    return len(llm.tokenize(prompt.encode(), add_bos=False, special=True))


def fit_context(llm, messages: list[dict], reserve: int) -> tuple[list[dict], int]:
    """Drop the oldest turns (never the system message or the last question) until the prompt plus
    `reserve` answer tokens fits in the context window. Returns (messages, how many turns dropped)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while len(turns) > 1 and prompt_tokens(llm, system + turns) + reserve > llm.n_ctx():
        turns = turns[2:] if turns[0]["role"] == "user" and len(turns) > 2 else turns[1:]
        dropped += 1
    if prompt_tokens(llm, system + turns) + reserve > llm.n_ctx():
        raise UserError(f"the question alone does not fit the {llm.n_ctx()}-token context with room for "
                        f"{reserve} answer tokens; shorten it, or raise --ctx / lower --max-tokens")
    return system + turns, dropped
