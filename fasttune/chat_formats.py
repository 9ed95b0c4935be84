"""The chat format of each model family we know: one row per model template, everything about prompts
and stops that differs between families (fasttune.chat masks with it, fasttune.modelfile writes it).

Kept apart from fasttune.chat so that the stages after training (export, Modelfiles) read the table
without importing TRL. The model templates in templates/ are the models' own, byte for byte (TRL ships
the same copies; tests/test_chat.py checks they are equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


def _read(name: str) -> str:
    return (TEMPLATES / name).read_text()


QWEN2_5_TEMPLATE = _read("qwen2_5.jinja")  # Qwen2.5-Instruct's own
QWEN3_TEMPLATE = _read("qwen3.jinja")  # Qwen3's own (0.6B-32B)
QWEN3_2507_TEMPLATE = _read("qwen3_2507.jinja")  # Qwen3-Instruct-2507's own (4B, 30B-A3B, 235B-A22B): no thinking
LLAMA3_2_TEMPLATE = _read("llama3_2.jinja")  # Llama 3.2-Instruct's own (1B, 3B)
LLAMA3_1_TEMPLATE = _read("llama3_1.jinja")  # Llama 3.1-Instruct's own (8B, 70B): the fixed date 3.2 is served with
PHI3_5_TEMPLATE = _read("phi3_5.jinja")  # Phi-3.5-mini-Instruct's own

# Qwen3 writes a reasoning block before each answer unless the caller passes enable_thinking=false, and
# llama.cpp's server passes true unless told otherwise. A run trains on plain answers (fasttune.chat
# refuses answers that hold reasoning), so the template it serves writes the empty block always: every
# renderer (transformers, llama-cpp-python, llama.cpp, Ollama) then gives the prompt the model was
# trained on, whatever flag it sets.
_THINKING_OFF_ON_REQUEST = """    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}"""
assert _THINKING_OFF_ON_REQUEST in QWEN3_TEMPLATE
QWEN3_SERVED = QWEN3_TEMPLATE.replace(_THINKING_OFF_ON_REQUEST, "    {{- '<think>\\n\\n</think>\\n\\n' }}")


# Llama 3.2 writes today's date into every system header when the renderer has a clock (transformers
# does, llama-cpp-python does not): training text would change by the day and never equal what chat
# renders. The run serves the template's own fallback date, always (date_string still overrides it).
_TODAY = """    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}"""
assert _TODAY in LLAMA3_2_TEMPLATE
LLAMA3_2_SERVED = LLAMA3_2_TEMPLATE.replace(_TODAY, """    {%- set date_string = "26 Jul 2024" %}""")

# Ollama's Go template for Llama 3.2's format without tools (Ollama adds <|begin_of_text|> when it
# tokenizes, as the GGUF says; the Jinja template writes it as text)
OLLAMA_LLAMA3_2 = """<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

{{ if .System }}{{ .System }}{{ end }}<|eot_id|>
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>

{{ .Content }}{{ if not $last }}<|eot_id|>{{ end }}
{{- end }}
{{- end }}"""


# Ollama's Go template for Phi-3.5's format (Ollama tokenizes with the GGUF's rules, which fold the newline
# after <|end|> into it, as training did)
OLLAMA_PHI3_5 = """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|user|>
{{ .Content }}<|end|>
{{ else if eq .Role "assistant" }}<|assistant|>
{{ .Content }}{{ if not $last }}<|end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|assistant|>
{{ end }}
{{- end }}"""


def _ollama_chatml(default_system: str | None, cue: str = "") -> str:
    """Ollama's Go template for a ChatML format (system, user and assistant turns; Ollama leaves the
    last assistant turn open). `cue`: what the format writes after the assistant header of the answer
    to come. tests/ollama renders it with Go and compares with the Jinja template."""
    default = f"{{{{ else }}}}<|im_start|>system\n{default_system}<|im_end|>\n" if default_system else ""
    return ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n" + default + "{{ end }}\n"
            "{{- range $i, $_ := .Messages }}\n"
            "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            "{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
            "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n{{ .Content }}{{ if not $last }}<|im_end|>\n"
            "{{ end }}\n"
            "{{- end }}\n"
            f"{{{{- if and (ne .Role \"assistant\") $last }}}}<|im_start|>assistant\n{cue}{{{{ end }}}}\n"
            "{{- end }}")


@dataclass(frozen=True)
class ChatFormat:
    """One family's chat format: everything about prompts and stops that differs between families."""

    name: str
    template: str  # the model's own Jinja template, as its tokenizer ships it
    served: str  # what a run renders with everywhere: training text, merged/, the GGUF, chat
    training: str  # `served` with {% generation %} over each answer and its end-of-turn token (ours: TRL
    #                patches some families, but puts the loss on Qwen3's empty reasoning block)
    ollama: str  # Go template for the Modelfile, rendered-equal to `served`
    stops: tuple[str, ...]  # the Modelfile's stop words
    end_of_turn: str = "<|im_end|>"  # the token that closes an answer: generation stops there whatever the
    #                                  tokenizer's eos says (a base checkpoint's is <|endoftext|>)
    not_in_answers: tuple[str, ...] = ()  # spellings an answer may not hold: the served prompt contradicts them
    roles: tuple[str, ...] = ("system", "user", "assistant", "tool")  # the roles `training` renders as `served` does


_CHATML_STOPS = ("<|im_end|>", "<|endoftext|>")
FORMATS = [
    ChatFormat("qwen2.5", QWEN2_5_TEMPLATE, QWEN2_5_TEMPLATE, _read("qwen2_5_training.jinja"),
               _ollama_chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."), _CHATML_STOPS),
    ChatFormat("smollm2", _read("smollm2.jinja"), _read("smollm2.jinja"), _read("smollm2_training.jinja"),
               _ollama_chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face"), _CHATML_STOPS),
    ChatFormat("qwen3", QWEN3_TEMPLATE, QWEN3_SERVED, _read("qwen3_training.jinja"),
               _ollama_chatml(None, cue="<think>\n\n</think>\n\n"), _CHATML_STOPS,
               not_in_answers=("<think>", "</think>")),
    ChatFormat("qwen3-2507", QWEN3_2507_TEMPLATE, QWEN3_2507_TEMPLATE, _read("qwen3_2507_training.jinja"),
               _ollama_chatml(None), _CHATML_STOPS),
    # Llama's templates render a tool result as an `ipython` turn and tool calls as JSON: the training
    # template covers plain turns only (fasttune.chat leaves conversations with tool turns out, saying so)
    ChatFormat("llama3.2", LLAMA3_2_TEMPLATE, LLAMA3_2_SERVED, _read("llama3_2_training.jinja"), OLLAMA_LLAMA3_2,
               ("<|eot_id|>", "<|end_of_text|>"), end_of_turn="<|eot_id|>", roles=("system", "user", "assistant")),
    # without tools 3.1 renders what 3.2 is served with: the same training template
    ChatFormat("llama3.1", LLAMA3_1_TEMPLATE, LLAMA3_1_TEMPLATE, _read("llama3_2_training.jinja"), OLLAMA_LLAMA3_2,
               ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"), end_of_turn="<|eot_id|>",
               roles=("system", "user", "assistant")),
    # Phi-3.5's template drops any other role without a word: the training template renders these alone
    ChatFormat("phi3.5", PHI3_5_TEMPLATE, PHI3_5_TEMPLATE, _read("phi3_5_training.jinja"), OLLAMA_PHI3_5,
               ("<|end|>", "<|endoftext|>"), end_of_turn="<|end|>", roles=("system", "user", "assistant")),
]


def chat_format(template: str | None) -> ChatFormat | None:
    """The row of FORMATS for a model's own template or a run's served one (None: not one we know)."""
    return next((f for f in FORMATS if template in (f.template, f.served)), None)


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos and its chat format's end-of-turn token."""
    fmt = chat_format(tokenizer.chat_template)
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(fmt.end_of_turn) if fmt else None}
    return sorted(ids - {None, tokenizer.unk_token_id})


def served_template(template: str | None) -> str:
    """The template a run serves for a tokenizer's `template`: Qwen2.5's for none (a base checkpoint),
    the format's served one for a known family, else the model's own."""
    if not template:
        return QWEN2_5_TEMPLATE
    fmt = chat_format(template)
    return fmt.served if fmt else template


def ensure_chat_template(tokenizer) -> None:
    """Give `tokenizer` the template a run serves (served_template)."""
    tokenizer.chat_template = served_template(tokenizer.chat_template)
