"""The assistant-token mask and the length policy, for the chat formats of fasttune.chat_formats.

The template is the tokenizer's Jinja, everywhere: it formats training text, is embedded in the GGUF
and drives llama.cpp chat. For training, a variant with `{% generation %}` markers renders the same
text and tells the tokenizer which tokens are the assistant's (`return_assistant_tokens_mask`, the
mechanism TRL's `assistant_only_loss` uses). Labels are exactly each assistant message's content
plus its end-of-turn token, so the model learns to stop. What differs between families is one row
of fasttune.chat_formats.FORMATS, found by the model's own template.
"""

from __future__ import annotations

import logging
import re
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from trl.chat_template_utils import get_training_chat_template

from fasttune import UserError, cpu_threads
from fasttune.chat_formats import FORMATS, chat_format
from fasttune.data import Example, Reject

logger = logging.getLogger(__name__)
IGNORE = -100  # label of a token that does not count towards the loss (PyTorch's ignore_index)


def training_template(tokenizer) -> str:
    """The template to train with: ours for the families in FORMATS, TRL's patched one for others it knows."""
    if fmt := chat_format(tokenizer.chat_template):
        return fmt.training
    try:
        return get_training_chat_template(tokenizer) or tokenizer.chat_template
    except ValueError as e:
        raise UserError(f"this model's chat template cannot mask assistant tokens ({e}); fasttune trains "
                        f"{', '.join(f.name for f in FORMATS)} and the families TRL's templates cover") from None


def tokenize_chat(tokenizer, messages: list[dict], template: str | None = None,
                  train_on: str = "all") -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation; labels are IGNORE outside assistant turns.

    train_on="last" keeps only the last assistant turn's labels (earlier answers are context).
    """
    return tokenize_chats(tokenizer, [messages], template or training_template(tokenizer), train_on)[0]


def tokenize_chats(tokenizer, conversations: list[list[dict]], template: str, train_on: str = "all",
                   special: str = "control") -> list[tuple[list[int], list[int]]]:
    """tokenize_chat for many conversations in one batched tokenizer call (faster).

    special="literal": a special token's spelling inside a message is tokenized as plain text.
    """
    out = tokenizer.apply_chat_template(
        conversations, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    pairs = zip(out["input_ids"], out["assistant_masks"])
    if special == "literal":
        specials = special_spellings(tokenizer)
        pairs = [_literal(tokenizer, conversation, template, specials) if _has_special(conversation, specials)
                 else pair for conversation, pair in zip(conversations, pairs)]
    return [_labels(list(ids), list(mask), train_on) for ids, mask in pairs]


def special_spellings(tokenizer) -> list[str]:
    """The text of every special token (<|im_end|>, <|im_start|>, <|endoftext|>, ...), longest first."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)


def _has_special(messages: list[dict], specials: list[str]) -> bool:
    return any(s in m["content"] for m in messages for s in specials)


def _literal(tokenizer, messages: list[dict], template: str, specials: list[str]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) with the template's special tokens as tokens and the messages' as text.

    Written by hand because a tokenizer either parses every special spelling (the template's and the
    text's alike) or none (split_special_tokens). The chat is rendered twice, the second time with each
    special spelling in the text blanked to the same length: the spellings left there are the template's.
    The text between them is tokenized with split_special_tokens, as the tokenizer splits at special
    tokens anyway.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(conversation):
        texts, spans = render_jinja_template(conversations=[conversation], chat_template=template,
                                             return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
        return texts[0], spans[0]

    text, generation = render(messages)
    template_only, _ = render([dict(m, content=_blank(m["content"], specials)) for m in messages])
    marks = list(re.finditer("|".join(map(re.escape, specials)), template_only))
    if len(text) != len(template_only) or any(text[m.start():m.end()] != m.group() for m in marks):
        raise UserError("this model's chat template changes the text of messages, so "
                        "--special_tokens_in_text literal cannot find them in it; use control")
    ids, spans, pos = [], [], 0  # spans: each token's [start, end) in text
    for mark in [*marks, None]:
        end = mark.start() if mark else len(text)
        piece = tokenizer(text[pos:end], add_special_tokens=False, split_special_tokens=True,
                          return_offsets_mapping=True)
        ids += piece["input_ids"]
        spans += [(pos + a, pos + b) for a, b in piece["offset_mapping"]]
        if mark:
            ids.append(tokenizer.convert_tokens_to_ids(mark.group()))
            spans.append((mark.start(), mark.end()))
            pos = mark.end()
    # A token is the assistant's when it overlaps a generation span, as transformers' own mask counts it
    # (a token that merges "\n" before an answer with its first word is trained).
    mask = [int(any(a < end and start < b for start, end in generation)) for a, b in spans]
    return ids, mask


def _blank(text: str, specials: list[str]) -> str:
    """Every special spelling in text replaced by as many NULs: the same length, no spelling left."""
    for s in specials:
        text = text.replace(s, "\0" * len(s))
    return text


def _labels(ids: list[int], mask: list[int], train_on: str) -> tuple[list[int], list[int]]:
    if train_on == "last" and 1 in mask:
        start = len(mask) - mask[::-1].index(1)  # one past the last trained token
        while start > 0 and mask[start - 1]:
            start -= 1
        mask = [0] * start + mask[start:]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


# Above this many examples or characters, tokenization is spread over processes (forked: they inherit
# the tokenizer instead of receiving an 11 MB pickle per piece). Below, a pool costs more than it saves.
PARALLEL_MIN, PARALLEL_MIN_CHARS, CHUNK = 8000, 2 << 20, 1000
_FORK_STATE: dict = {}


def _tokenize_chunk(bounds: tuple[int, int]):
    s = _FORK_STATE
    return tokenize_chats(s["tokenizer"], s["conversations"][bounds[0]:bounds[1]], s["template"], s["train_on"],
                          s["special"])


def tokenize_all(tokenizer, conversations: list[list[dict]], template: str, train_on: str = "all",
                 special: str = "control"):
    """tokenize_chats over a whole dataset, in pieces, on every core for large inputs."""
    import multiprocessing

    n, threads = len(conversations), cpu_threads()
    chars = sum(len(m["content"]) for c in conversations for m in c)
    parallel = threads > 1 and n > 1 and (n >= PARALLEL_MIN or chars >= PARALLEL_MIN_CHARS)
    step = max(1, min(CHUNK, -(-n // threads))) if parallel else CHUNK  # a few long examples: one per core
    bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
    _FORK_STATE.update(tokenizer=tokenizer, conversations=conversations, template=template, train_on=train_on,
                       special=special)
    try:
        if parallel:
            with multiprocessing.get_context("fork").Pool(min(threads, len(bounds))) as pool:
                parts = pool.map(_tokenize_chunk, bounds)
        else:
            parts = map(_tokenize_chunk, bounds)
        return [pair for part in parts for pair in part]
    finally:
        _FORK_STATE.clear()


@dataclass
class Prepared:
    """Tokenized examples ready for training, the ones left out (with reasons), and statistics."""

    rows: list[dict]  # {"input_ids", "labels"} per kept example, truncated to max_length
    kept: list[Example]
    rejects: list[Reject]
    stats: dict
    # tokens of every kept example, after truncation (an array: 4 bytes each, not a Python int)
    kept_lengths: array = field(default_factory=lambda: array("I"))


def prepare(examples: list[Example], tokenizer, max_length: int, truncation: str = "drop",
            train_on: str = "all", special: str = "control") -> Prepared:
    """prepare_chunks for examples already in memory."""
    return require_examples(prepare_chunks([examples], tokenizer, max_length, truncation, train_on, special))


def prepare_chunks(chunks: Iterable[list[Example]], tokenizer, max_length: int, truncation: str = "drop",
                   train_on: str = "all", special: str = "control", hold: int | None = None,
                   check: Callable[[list[Example]], None] | None = None) -> Prepared:
    """Tokenize every example as training will, apply the truncation policy, count everything.

    An example whose answer does not fit in max_length is left out (truncation="drop") or trained
    on the part that fits (truncation="keep"); one with nothing left to train is always left out.
    Left-out examples are returned as rejects with the reason, never dropped silently (TRL itself
    would drop fully masked examples without a word). `chunks` may be streamed from the file: only
    the first `hold` kept examples stay in memory (None: all of them, for training); the statistics
    count every one. check: called with each chunk's kept examples (an eval set's references).
    """
    if truncation not in ("drop", "keep"):
        raise UserError(f"--truncation {truncation}: choose drop or keep")
    if train_on not in ("all", "last"):
        raise UserError(f"--train_on {train_on}: choose all or last")
    if special not in ("control", "literal"):
        raise UserError(f"--special_tokens_in_text {special}: choose control or literal")
    if special == "literal" and not tokenizer.is_fast:  # _literal needs character offsets
        raise UserError("--special_tokens_in_text literal needs a fast tokenizer (tokenizer.json beside the model); "
                        "this model has a slow one")
    template = training_template(tokenizer)
    fmt = chat_format(tokenizer.chat_template)
    out = Prepared([], [], [], {})
    records, lengths, n_cut, n_empty, tokens, trained, marked, first_marked = 0, array("I"), 0, 0, 0, 0, 0, None
    for examples in chunks:
        encoded = tokenize_all(tokenizer, [ex.messages for ex in examples], template, train_on, special)
        records += len(examples)
        kept_here = []
        for ex, (ids, labels) in zip(examples, encoded):
            if fmt and (held := _held(ex, fmt.not_in_answers)):
                why = (f"an answer holds {held}: a {fmt.name} run is served without reasoning, so it trains plain "
                       "answers; remove the reasoning block")
                out.rejects.append(Reject(ex.source, why, ex.record))
                continue
            if fmt and (role := next((m["role"] for m in ex.messages if m["role"] not in fmt.roles), None)):
                why = (f"a {role} message: fasttune trains {fmt.name} on {', '.join(fmt.roles)} turns only (its "
                       f"template writes {role} turns in a form the training template does not); leave them out")
                out.rejects.append(Reject(ex.source, why, ex.record))
                continue
            lengths.append(len(ids))
            n_total = sum(lab != IGNORE for lab in labels)
            n_kept = sum(lab != IGNORE for lab in labels[:max_length])
            if n_kept == 0:
                n_empty += 1
                if n_total:
                    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
                    why = (f"nothing to train within max_seq_length={max_length}: the answer starts at token {first}; "
                           "raise --max_seq_length or shorten the prompt")
                else:
                    why = "no assistant tokens to train"
                out.rejects.append(Reject(ex.source, why, ex.record))
                continue
            if n_kept < n_total:
                n_cut += 1
                if truncation == "drop":
                    out.rejects.append(Reject(ex.source, f"answer cut by max_seq_length={max_length} (conversation is "
                                                         f"{len(ids)} tokens); raise --max_seq_length, or pass "
                                                         "--truncation keep to train on the part that fits", ex.record))
                    continue
            kept_here.append(ex)
            out.kept_lengths.append(min(len(ids), max_length))
            tokens += out.kept_lengths[-1]
            trained += n_kept
            if hold is None or len(out.rows) < hold:
                out.rows.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
                out.kept.append(ex)
        if check:
            check(kept_here)
        found = special_tokens_in_text(tokenizer, kept_here)  # counted either way; warned about where tokens
        marked, first_marked = marked + len(found), first_marked or (found[0] if found else None)
        del examples, encoded, kept_here  # this chunk is freed before the next one is read
    n_kept_all = len(out.kept_lengths)
    out.stats = {
        "records": records, "kept": n_kept_all, "tokens": tokens, "trained_tokens": trained,
        "special_tokens_in_text": marked,
        "trained_fraction": round(trained / max(tokens, 1), 4),
        "nothing_trained": n_empty, "answers_cut": n_cut, "truncation": truncation, "max_length": max_length,
        "length_percentiles": _percentiles(lengths),
    }
    if n_cut:
        logger.warning("%d of %d examples have answers longer than max_seq_length=%d: %s", n_cut, records,
                       max_length, "left out (--truncation drop)" if truncation == "drop"
                       else "trained on the part that fits (--truncation keep); they never see their <|im_end|>")
    if n_empty:
        logger.warning("%d examples have nothing to train within max_seq_length=%d: left out", n_empty, max_length)
    if marked and special == "control":
        logger.warning("%d examples have a control token written in their text (first: %s, %s): the tokenizer reads "
                       "it as the token itself, so the model learns to stop or switch roles there; if it was meant "
                       "as text, pass --special_tokens_in_text literal (or remove it from the data)",
                       marked, *first_marked)
    return out


def _held(example: Example, spellings: tuple[str, ...]) -> str | None:
    """The first of `spellings` an assistant message of `example` holds."""
    return next((s for m in example.messages if m["role"] == "assistant" for s in spellings if s in m["content"]), None)


def require_examples(prepared: Prepared) -> Prepared:
    """One example left to train on, or the first reason there is none."""
    if not prepared.stats["kept"]:
        raise UserError(f"no example is left to train on: {prepared.rejects[0].source}: {prepared.rejects[0].reason}")
    return prepared


def special_tokens_in_text(tokenizer, examples: list[Example]) -> list[tuple[str, str]]:
    """(source, token) for every example whose message text contains a special token's spelling
    (<|im_end|>, <|im_start|>, <|endoftext|>, ...)."""
    specials = special_spellings(tokenizer)
    found = []
    for ex in examples:
        text = "\n".join(m["content"] for m in ex.messages)
        hit = next((t for t in specials if t in text), None)
        if hit:
            found.append((ex.source, hit))
    return found


def _percentiles(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]} if ordered else {}
