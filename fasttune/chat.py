"""Qwen2.5 ChatML: the one chat template, and the assistant-token mask.

The template is the tokenizer's Jinja, everywhere: it formats training text, is embedded in the GGUF
and drives llama.cpp chat. For training, a variant with `{% generation %}` markers renders the same
text and tells the tokenizer which tokens are the assistant's (`return_assistant_tokens_mask`, the
mechanism TRL's `assistant_only_loss` uses). Labels are exactly each assistant message's content
plus its `<|im_end|>`, so the model learns to stop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trl.chat_template_utils import get_training_chat_template
from trl.chat_template_utils import qwen2_5_chat_template as QWEN2_5_TEMPLATE  # Qwen2.5-Instruct's own

from fasttune import UserError
from fasttune.data import raise_problems

TRAINING_TEMPLATE_PATH = Path(__file__).parent / "templates" / "qwen2_5_training.jinja"
TRAINING_TEMPLATE = TRAINING_TEMPLATE_PATH.read_text()
logger = logging.getLogger(__name__)
IGNORE = -100  # label of a token that does not count towards the loss (PyTorch's ignore_index)


def ensure_chat_template(tokenizer) -> None:
    """Give a tokenizer without a chat template (a base checkpoint) Qwen2.5's."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = QWEN2_5_TEMPLATE


def training_template(tokenizer) -> str:
    """The template to train with: ours for Qwen2.5, TRL's patched one for other known families."""
    if tokenizer.chat_template == QWEN2_5_TEMPLATE:
        return TRAINING_TEMPLATE
    try:
        return get_training_chat_template(tokenizer) or tokenizer.chat_template
    except ValueError as e:
        raise UserError(f"this model's chat template cannot mask assistant tokens: {e}") from None


def tokenize_chat(tokenizer, messages: list[dict], template: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are IGNORE outside assistant turns."""
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=template or training_template(tokenizer),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = list(out["input_ids"])
    labels = [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])]
    return ids, labels


def render_mask(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The conversation as text with trained spans in [[double brackets]], for a person to check."""
    parts, trained = [], False
    for tok, lab in zip(input_ids, labels):
        is_trained = lab != IGNORE
        if is_trained != trained:
            parts.append("[[" if is_trained else "]]")
            trained = is_trained
        parts.append(tokenizer.decode([tok]))
    if trained:
        parts.append("]]")
    return "".join(parts)


def check_trainable(examples, tokenizer, max_length: int) -> dict:
    """Tokenize every example as training will, and refuse ones with nothing left to train.

    TRL truncates to max_length and then silently drops examples whose labels are all IGNORE;
    here each such example is an error naming its file and line. Answers that truncation cuts
    short are counted and logged. Returns summary statistics.
    """
    template = training_template(tokenizer)
    problems, cut, tokens, trained = [], 0, 0, 0
    for ex in examples:
        ids, labels = tokenize_chat(tokenizer, ex.messages, template)
        kept = labels[:max_length]
        n_trained = sum(lab != IGNORE for lab in kept)
        if n_trained == 0:
            first = next((i for i, lab in enumerate(labels) if lab != IGNORE), None)
            why = ("has no assistant turn to train" if first is None else
                   f"its answer starts at token {first}, past max_seq_length={max_length}; "
                   "raise --max_seq_length or shorten the prompt")
            problems.append(f"{ex.source}: nothing to train: {why}")
            continue
        cut += n_trained < sum(lab != IGNORE for lab in labels)
        tokens += len(ids[:max_length])
        trained += n_trained
    raise_problems(problems)
    if cut:
        logger.warning("%d of %d examples have answers cut by max_seq_length=%d; they train on part of the answer "
                       "and never see its <|im_end|>", cut, len(examples), max_length)
    stats = {"examples": len(examples), "tokens": tokens, "trained_tokens": trained,
             "trained_fraction": round(trained / max(tokens, 1), 4), "answers_cut": cut}
    logger.info("data: %d examples, %d tokens, %d trained (%.1f%%), %d answers cut", len(examples), tokens,
                trained, 100 * stats["trained_fraction"], cut)
    return stats
