"""The assistant mask: labels are exactly each assistant content plus its <|im_end|>."""

import pytest

from fasttune import UserError, chat, chat_formats
from fasttune.chat import IGNORE, prepare, tokenize_chat
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


def family_tokenizer(fmt, qwen2):
    """The family's own tokenizer (the ChatML families share Qwen2's spelling of their tokens)."""
    from transformers import AutoTokenizer

    from fasttune import tiny

    built = {"qwen3": tiny.qwen3_tokenizer_dir, "qwen3-2507": tiny.qwen3_tokenizer_dir,
             "llama3.2": tiny.llama3_tokenizer_dir, "llama3.1": tiny.llama3_tokenizer_dir,
             "phi3.5": tiny.phi3_tokenizer_dir}.get(fmt.name)
    return AutoTokenizer.from_pretrained(built()) if built else qwen2


@pytest.mark.parametrize("fmt", chat_formats.FORMATS, ids=[f.name for f in chat_formats.FORMATS])
def test_training_templates_render_the_same_text_and_mask_each_answer(tokenizer, fmt):
    """Each of our training templates against the template the run serves, with and without a system
    message (two families insert a default one), and its mask on a two-turn conversation: each answer
    and its end-of-turn token, nothing the template adds (Qwen3's empty reasoning block included)."""
    tokenizer = family_tokenizer(fmt, tokenizer)
    system = [{"role": "system", "content": "S"}]
    turns = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
             {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]
    for messages in (system + turns, turns):
        for kwargs in ({}, {"add_generation_prompt": True}):
            msgs = messages[:-1] if kwargs else messages
            assert (tokenizer.apply_chat_template(msgs, chat_template=fmt.training, tokenize=False, **kwargs)
                    == tokenizer.apply_chat_template(msgs, chat_template=fmt.served, tokenize=False, **kwargs))
        ids, labels = tokenize_chat(tokenizer, messages, template=fmt.training)
        trained = [i for i, label in zip(ids, labels) if label != IGNORE]
        # the answers' own tokens (a SentencePiece tokenizer puts its space in front of each: ▁A)
        assert trained == [i for answer in ("A", "A2") for i in
                           tokenizer.encode(answer + fmt.end_of_turn, add_special_tokens=False)]


def test_qwen3_is_served_without_thinking_whatever_the_caller_asks(tokenizer):
    """Qwen3: the prompt every renderer writes ends in the empty reasoning block training put before the
    answer, also when the caller sets enable_thinking=true (llama.cpp's server does by default)."""
    fmt = chat_formats.chat_format(chat_formats.QWEN3_TEMPLATE)
    assert fmt.name == "qwen3" and chat_formats.chat_format(fmt.served) is fmt
    qa = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    render = lambda msgs, template, **kw: tokenizer.apply_chat_template(msgs, chat_template=template,  # noqa: E731
                                                                        tokenize=False, **kw)
    prompt = render(qa[:1], fmt.served, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render(qa, fmt.served).startswith(prompt)  # training text = the served prompt + the answer
    for thinking in (True, False):
        assert render(qa[:1], fmt.served, add_generation_prompt=True, enable_thinking=thinking) == prompt
    # Qwen3's own, for contrast: without the flag the model is asked to think
    assert render(qa[:1], fmt.template, add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    # reasoning in the conversation: still rendered exactly, the block being the model's output
    for messages in ([qa[0], dict(qa[1], reasoning_content="R")], [qa[0], dict(qa[1], content="<think>R</think>A")]):
        assert render(messages, fmt.training) == render(messages, fmt.served)
        ids, labels = tokenize_chat(tokenizer, messages, template=fmt.training)
        assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE]) == (
            "<think>\nR\n</think>\n\nA<|im_end|>")


def test_qwen3_answers_with_reasoning_are_refused_and_counted(tokenizer):
    qwen3 = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    qwen3.chat_template = chat_formats.QWEN3_SERVED
    plain = chat_example("d.jsonl:1", "Dose?", "300 mg.")
    reasoned = chat_example("d.jsonl:2", "Dose?", "<think>weight x 2</think>300 mg.")
    prepared = prepare([plain, reasoned], qwen3, max_length=256)
    assert prepared.stats["records"] == 2 and prepared.stats["kept"] == 1
    assert [(r.source, r.reason.split(":")[0]) for r in prepared.rejects] == [("d.jsonl:2", "an answer holds <think>")]


def test_tool_turns_are_left_out_where_the_training_template_cannot_render_them(tokenizer):
    """Llama's templates write a tool result as an `ipython` turn, which the training template does not:
    such a conversation is left out with the reason; ChatML's training templates render tool turns."""
    from transformers import AutoTokenizer

    from fasttune import tiny

    tool = Example("d.jsonl:2", [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "Looking."},
                                 {"role": "tool", "content": "300"}, {"role": "user", "content": "So?"},
                                 {"role": "assistant", "content": "300 mg."}], {})
    examples = [chat_example("d.jsonl:1", "Dose?", "300 mg."), tool]
    llama = AutoTokenizer.from_pretrained(tiny.llama3_tokenizer_dir())
    for template in (chat_formats.LLAMA3_2_SERVED, chat_formats.LLAMA3_1_TEMPLATE):
        llama.chat_template = template
        prepared = prepare(examples, llama, max_length=256)
        assert prepared.stats["records"] == 2 and prepared.stats["kept"] == 1
        assert [(r.source, r.reason.split(":")[0]) for r in prepared.rejects] == [("d.jsonl:2", "a tool message")]
    assert prepare(examples, tokenizer, max_length=256).stats["kept"] == 2  # Qwen2.5


def test_a_known_family_is_served_its_format(tokenizer):
    from transformers import AutoTokenizer

    qwen3 = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    qwen3.chat_template = chat_formats.QWEN3_TEMPLATE
    chat_formats.ensure_chat_template(qwen3)
    assert qwen3.chat_template == chat_formats.QWEN3_SERVED
    assert chat.training_template(qwen3) == chat_formats.chat_format(chat_formats.QWEN3_TEMPLATE).training


def test_preview_spans_mark_trained_text(tokenizer):
    from fasttune.preview import spans

    ids, labels = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    runs = spans(tokenizer, ids, labels)
    assert runs[-2:] == [("Yo<|im_end|>", True), ("\n", False)]
    assert sum(trained for _, trained in runs) == 1


def test_train_on_last_keeps_only_the_final_answer(tokenizer):
    messages = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "a."},
                {"role": "user", "content": "B?"}, {"role": "assistant", "content": "b."}]
    ids, every = tokenize_chat(tokenizer, messages)
    _, last = tokenize_chat(tokenizer, messages, train_on="last")
    assert [t for t in last if t != IGNORE] == encode(tokenizer, "b.<|im_end|>")
    assert [t for t in every if t != IGNORE] == encode(tokenizer, "a.<|im_end|>") + encode(tokenizer, "b.<|im_end|>")


def chat_example(source, prompt, answer):
    return Example(source, [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], {})


def test_prepare_leaves_out_what_cannot_be_trained_and_says_why(tokenizer):
    examples = [
        chat_example("d.jsonl:1", "short", "ok"),
        chat_example("d.jsonl:2", "word " * 300, "ok"),  # the answer starts past the limit
        chat_example("d.jsonl:3", "short", "answer " * 100),  # the answer is cut
    ]
    p = prepare(examples, tokenizer, max_length=64)
    assert [e.source for e in p.kept] == ["d.jsonl:1"]
    reasons = {r.source: r.reason for r in p.rejects}
    assert reasons["d.jsonl:2"].startswith("nothing to train within max_seq_length=64: the answer starts at token")
    assert reasons["d.jsonl:3"].startswith("answer cut by max_seq_length=64")
    assert p.stats["nothing_trained"] == 1 and p.stats["answers_cut"] == 1 and p.stats["records"] == 3

    kept = prepare(examples, tokenizer, max_length=64, truncation="keep")
    assert [e.source for e in kept.kept] == ["d.jsonl:1", "d.jsonl:3"]  # trained on the part that fits
    assert len(kept.rows[1]["input_ids"]) == 64 and IM_END not in kept.rows[1]["labels"]
    assert [r.source for r in kept.rejects] == ["d.jsonl:2"]  # nothing to train is left out either way


def test_prepare_statistics(tokenizer):
    p = prepare([chat_example(f"d:{i}", "q " * i, "a") for i in range(1, 11)], tokenizer, max_length=1024)
    s = p.stats
    assert s["kept"] == 10 and s["answers_cut"] == 0 and s["nothing_trained"] == 0
    assert s["trained_tokens"] == 10 * len(encode(tokenizer, "a<|im_end|>"))
    assert s["length_percentiles"]["max"] == max(len(r["input_ids"]) for r in p.rows)
    assert 0 < s["trained_fraction"] < 0.2


def test_nothing_left_is_an_error(tokenizer):
    with pytest.raises(UserError, match="no example is left to train on: d.jsonl:2"):
        prepare([chat_example("d.jsonl:2", "word " * 300, "ok")], tokenizer, max_length=64)


def test_unknown_policies_name_the_flag(tokenizer):
    examples = [chat_example("d:1", "q", "a")]
    with pytest.raises(UserError, match="--truncation cut: choose drop or keep"):
        prepare(examples, tokenizer, 64, truncation="cut")
    with pytest.raises(UserError, match="--train_on first: choose all or last"):
        prepare(examples, tokenizer, 64, train_on="first")
    with pytest.raises(UserError, match="--special_tokens_in_text text: choose control or literal"):
        prepare(examples, tokenizer, 64, special="text")
    from types import SimpleNamespace

    with pytest.raises(UserError, match="literal needs a fast tokenizer"):  # no character offsets without one
        prepare(examples, SimpleNamespace(is_fast=False), 64, special="literal")


def test_control_tokens_written_in_the_text_are_counted_and_warned(tokenizer, caplog):
    examples = [Example("d.jsonl:1", [{"role": "user", "content": "Say <|im_end|> twice"},
                                      {"role": "assistant", "content": "<|im_end|> <|im_end|>"}], {}),
                Example("d.jsonl:2", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], {})]
    prepared = prepare(examples, tokenizer, 256)
    assert prepared.stats["special_tokens_in_text"] == 1
    assert "1 examples have a control token written in their text (first: d.jsonl:1, <|im_end|>)" in caplog.text


def test_literal_keeps_control_spellings_as_text(tokenizer, caplog):
    """--special_tokens_in_text literal: the text's <|im_end|> and <|im_start|> are plain tokens; the
    template's stay control tokens, and the mask is the same shape as for any other text."""
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Say <|im_end|> now"},
                {"role": "assistant", "content": "Done <|im_end|><|im_start|>system x"}]
    ex = Example("d.jsonl:1", messages, {})
    prepared = prepare([ex], tokenizer, 256, special="literal")
    row = prepared.rows[0]
    text = lambda s: encode(tokenizer, s) if "<|" not in s else tokenizer(s, add_special_tokens=False,  # noqa: E731
                                                                          split_special_tokens=True)["input_ids"]
    want = ([], [])
    for part, trained in [("<|im_start|>", False), ("system\nYou are terse.", False), ("<|im_end|>", False),
                          ("\n", False), ("<|im_start|>", False), ("user\nSay <|im_end|> now", False),
                          ("<|im_end|>", False), ("\n", False), ("<|im_start|>", False), ("assistant\n", False),
                          ("Done <|im_end|><|im_start|>system x", True), ("<|im_end|>", True), ("\n", False)]:
        ids = [tokenizer.convert_tokens_to_ids(part)] if part in ("<|im_start|>", "<|im_end|>") else text(part)
        want[0].extend(ids)
        want[1].extend(ids if trained else [IGNORE] * len(ids))
    assert (row["input_ids"], row["labels"]) == want
    assert row["input_ids"].count(IM_END) == 3  # the template's three ends, none from the text
    assert prepared.stats["special_tokens_in_text"] == 1 and "control token" not in caplog.text
    # the default reads them as control tokens: two more <|im_end|>
    assert prepare([ex], tokenizer, 256).rows[0]["input_ids"].count(IM_END) == 5


@pytest.mark.parametrize("answer", ["Paris.", "\nParis.", "\n\nParis.", " Paris.\n", "\n\n\n"])
def test_literal_equals_control_on_text_without_special_spellings(tokenizer, answer):
    """Tokens and mask as transformers' own: a token that merges the template's newline with an
    answer's leading newlines counts as the answer's in both."""

    messages = [{"role": "user", "content": "Capital of France? <|im"}, {"role": "assistant", "content": answer},
                {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]
    template = chat.training_template(tokenizer)
    ids, mask = chat._literal(tokenizer, messages, template, chat.special_spellings(tokenizer))
    assert chat._labels(ids, mask, "all") == tokenize_chat(tokenizer, messages)


def test_literal_refuses_a_template_that_rewrites_messages(tokenizer):

    template = chat.training_template(tokenizer).replace("message.content", "message.content | replace('<', '&lt;')")
    assert template != chat.training_template(tokenizer)
    messages = [{"role": "user", "content": "say <|im_end|>"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(UserError, match="changes the text of messages"):
        chat._literal(tokenizer, messages, template, chat.special_spellings(tokenizer))


def test_a_few_long_examples_are_tokenized_on_every_core_with_the_same_result(tokenizer, monkeypatch):
    """Long records make small chunks: the pool is chosen by characters too, one example per core."""
    import multiprocessing


    conversations = [[{"role": "user", "content": f"question {i} " * 40},
                      {"role": "assistant", "content": f"answer {i} " * 60}] for i in range(3)]
    template = chat.training_template(tokenizer)
    serial = chat.tokenize_all(tokenizer, conversations, template)
    pools = []
    real = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: pools.append(method) or real(method))
    monkeypatch.setattr(chat, "cpu_threads", lambda: 2)
    assert chat.tokenize_all(tokenizer, conversations, template) == serial and pools == []  # 3 short ones: serial
    monkeypatch.setattr(chat, "PARALLEL_MIN_CHARS", 1000)
    assert chat.tokenize_all(tokenizer, conversations, template) == serial and pools == ["fork"]


def test_model_templates_are_the_models_own():
    """Our copies identify real checkpoints by equality: they must be TRL's copies of the models' templates."""
    from trl.chat_template_utils import (llama3_1_chat_template, llama3_2_chat_template, qwen2_5_chat_template,
                                         qwen3_chat_template, qwen3_instruct_2507_chat_template)

    assert chat_formats.QWEN2_5_TEMPLATE == qwen2_5_chat_template and chat_formats.QWEN3_TEMPLATE == qwen3_chat_template
    assert chat_formats.QWEN3_2507_TEMPLATE == qwen3_instruct_2507_chat_template
    assert chat_formats.LLAMA3_2_TEMPLATE == llama3_2_chat_template and chat_formats.LLAMA3_1_TEMPLATE == llama3_1_chat_template
