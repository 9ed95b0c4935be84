"""The assistant mask: labels are exactly each assistant content plus its <|im_end|>."""

import pytest

from fasttune import UserError
from fasttune.chat import IGNORE, QWEN2_5_TEMPLATE, TRAINING_TEMPLATE, check_trainable, render_mask, tokenize_chat
from fasttune.data import Example

IM_END = 151645


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def expected(tokenizer, pieces):
    """Hand-built (ids, labels) from (text, trained?) pieces of the ChatML rendering."""
    ids, labels = [], []
    for text, trained in pieces:
        part = encode(tokenizer, text)
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


def test_single_turn_mask(tokenizer):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    want = expected(tokenizer, [
        ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>", True),
        ("\n", False),
    ])
    assert tokenize_chat(tokenizer, messages) == want


def test_multi_turn_mask_trains_every_assistant_turn(tokenizer):
    messages = [
        {"role": "user", "content": "Dose of aspirin in ACS?"},
        {"role": "assistant", "content": "300 mg loading."},
        {"role": "user", "content": "Then?"},
        {"role": "assistant", "content": "75 mg daily."},
    ]
    ids, labels = tokenize_chat(tokenizer, messages)
    want = expected(tokenizer, [
        ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
         "<|im_start|>user\nDose of aspirin in ACS?<|im_end|>\n<|im_start|>assistant\n", False),
        ("300 mg loading.<|im_end|>", True),
        ("\n<|im_start|>user\nThen?<|im_end|>\n<|im_start|>assistant\n", False),
        ("75 mg daily.<|im_end|>", True),
        ("\n", False),
    ])
    assert (ids, labels) == want
    assert labels.count(IM_END) == 2  # the model learns to stop after each answer


def test_training_template_renders_the_same_text(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "U2"},
                {"role": "assistant", "content": "A2"}]
    for kwargs in ({}, {"add_generation_prompt": True}):
        msgs = messages[:-1] if kwargs else messages
        assert (tokenizer.apply_chat_template(msgs, chat_template=TRAINING_TEMPLATE, tokenize=False, **kwargs)
                == tokenizer.apply_chat_template(msgs, chat_template=QWEN2_5_TEMPLATE, tokenize=False, **kwargs))


def test_render_mask_marks_trained_spans(tokenizer):
    ids, labels = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    text = render_mask(tokenizer, ids, labels)
    assert text.endswith("assistant\n[[Yo<|im_end|>]]\n")
    assert text.count("[[") == 1


def test_fully_masked_example_is_an_error_not_a_silent_drop(tokenizer):
    long_prompt = "word " * 300
    examples = [
        Example("d.jsonl:1", [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}], {}),
        Example("d.jsonl:2", [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "ok"}], {}),
    ]
    with pytest.raises(UserError, match=r"d\.jsonl:2: nothing to train: .*max_seq_length=64"):
        check_trainable(examples, tokenizer, max_length=64)
    stats = check_trainable(examples, tokenizer, max_length=1024)
    assert stats["examples"] == 2 and stats["answers_cut"] == 0
    assert 0 < stats["trained_fraction"] < 0.1
