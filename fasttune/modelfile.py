"""Ollama Modelfile beside a GGUF: `ollama create NAME -f Modelfile.<file>` runs it with the right template."""

from __future__ import annotations

from pathlib import Path

from fasttune.rundir import write_text

# Ollama's Go template equivalent to the Qwen2.5 Jinja template for system/user/assistant turns
# (tests render both with Go and Jinja and compare). Ollama leaves the last assistant turn open.
OLLAMA_QWEN2_5_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ else }}<|im_start|>system
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def write_modelfile(gguf_path: Path, system_prompt: str | None = None, adapter: Path | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f <this file>`. With `adapter`, the
    file is the base model and the adapter a GGUF LoRA on top (Ollama's ADAPTER line)."""
    lines = [f"FROM ./{gguf_path.name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter.name}")
    lines += [f'TEMPLATE """{OLLAMA_QWEN2_5_TEMPLATE}"""', 'PARAMETER stop "<|im_end|>"',
              'PARAMETER stop "<|endoftext|>"', "PARAMETER temperature 0"]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    path = gguf_path.with_name(f"Modelfile.{(adapter or gguf_path).stem}")
    write_text(path, "\n".join(lines) + "\n")
    return path
