"""Ollama Modelfile beside a GGUF: `ollama create NAME -f Modelfile.<file>` runs it with the right template."""

from __future__ import annotations

import logging
from pathlib import Path

from fasttune import gguf_file
from fasttune.chat_formats import chat_format
from fasttune.infer import original_context
from fasttune.rundir import write_text

logger = logging.getLogger(__name__)


def write_modelfile(gguf_path: Path, system_prompt: str | None = None, adapter: Path | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f <this file>`. With `adapter`, the
    file is the base model and the adapter a GGUF LoRA on top (Ollama's ADAPTER line). The template
    and stop words are those of the chat format embedded in the GGUF (fasttune.chat_formats.FORMATS)."""
    lines = [f"FROM ./{gguf_path.name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter.name}")
    fields = gguf_file.read(gguf_path).fields
    embedded = fields.get("tokenizer.chat_template")
    fmt = chat_format(embedded)
    if fmt and embedded == fmt.served:  # the Go template renders the served one (Qwen3's own differs)
        lines += [f'TEMPLATE """{fmt.ollama}"""', *(f'PARAMETER stop "{s}"' for s in fmt.stops)]
    else:  # Ollama then guesses from the GGUF's Jinja template, which it cannot run
        logger.warning("%s: its chat template is none fasttune has an Ollama template for; the Modelfile has "
                       "no TEMPLATE line, so check what `ollama run` sends before relying on it", gguf_path.name)
    lines.append("PARAMETER temperature 0")
    if original := original_context(fields):  # past it llama.cpp applies Phi-3's long-context factors to every token
        lines.append(f"PARAMETER num_ctx {original}")
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    path = gguf_path.with_name(f"Modelfile.{(adapter or gguf_path).stem}")
    write_text(path, "\n".join(lines) + "\n")
    return path
