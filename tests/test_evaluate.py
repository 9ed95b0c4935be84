"""Metrics: each scores what its task's answer must get right, and says when it cannot parse one."""

import json

import pytest

from fasttune import UserError
from fasttune.evaluate import METRICS, evaluate, final_answer, run_variants, table
from fasttune.tiny import tiny_model_dir


def score(metric, pred, ref, tolerance=0.02):
    return METRICS[metric](pred, ref, tolerance)


@pytest.mark.parametrize("pred, right, parsed", [
    ("CrCl = (140 - 60) x 70 / (72 x 1.1) = 70.7 mL/min\nAnswer: 70.7 mL/min", 1.0, True),
    ("Answer: 71 mL/min", 1.0, True),          # within 2 %
    ("Answer: 75 mL/min", 0.0, True),          # 6 % off
    ("Answer: 70.7 mg/dL", 0.0, True),         # right number, wrong unit
    ("Answer: 70.7", 0.0, True),               # unit missing
    ("I cannot compute that.", 0.0, False),
])
def test_numeric(pred, right, parsed):
    s = score("numeric", pred, "CrCl = ...\nAnswer: 70.7 mL/min")
    assert (s.score, s.parsed) == (right, parsed)


def test_numeric_units_spelled_alike():
    assert score("numeric", "Answer: 24.2 kg/m2", "Answer: 24.2 kg/m²").score == 1.0
    assert score("numeric", "Answer: 1,250 mL", "Answer: 1250 mL").score == 1.0


@pytest.mark.parametrize("pred, right, label", [
    ("B) Metformin", 1.0, True), ("B", 1.0, False), ("(b) metformin.", 1.0, True), ("Answer: B) Insulin", 1.0, False),
    ("C) Insulin", 0.0, False),
])
def test_choice_letter_and_label(pred, right, label):
    s = score("choice", pred, "B) Metformin")
    assert s.score == right and s.parsed and s.detail["letter_and_label"] == label


def test_choice_unparseable():
    assert not score("choice", "The best drug is metformin", "B) Metformin").parsed
    assert not score("choice", "A patient with diabetes needs metformin", "A) Metformin").parsed


def test_exact_is_normalized():
    assert score("exact", "The left ventricle.", "left ventricle").score == 1.0
    assert score("exact", "right ventricle", "left ventricle").score == 0.0


def test_json_fields_and_lists():
    ref = json.dumps({"drug": "Amoxicillin", "dose_mg": 500, "allergies": ["penicillin", "latex"]})
    perfect = score("json", '```json\n{"drug": "amoxicillin", "dose_mg": 500, "allergies": ["latex", "Penicillin"]}\n```', ref)
    assert perfect.score == 1.0 and perfect.detail["keys_present"]
    partial = score("json", '{"drug": "Amoxicillin", "dose_mg": 250, "allergies": ["penicillin"], "x": 1}', ref)
    assert partial.detail["fields"] == {"drug": 1.0, "dose_mg": 0.0, "allergies": pytest.approx(2 / 3)}
    assert partial.detail["extra_keys"] == ["x"] and partial.score == pytest.approx((1 + 0 + 2 / 3) / 3)
    broken = score("json", '{"drug": "Amoxicillin",', ref)
    assert (broken.score, broken.parsed) == (0.0, False)


def test_rouge_l():
    ref = "Elderly man with pneumonia treated with antibiotics."
    assert score("rouge", ref, ref).score == pytest.approx(1.0)
    assert 0.2 < score("rouge", "Elderly man treated for pneumonia.", ref).score < 0.9
    assert score("rouge", "Unrelated words entirely here.", ref).score == 0.0


def test_cot_final_answer():
    ref = "Step 1: 3 tablets x 2 = 6.\nStep 2: 6 x 7 = 42.\nAnswer: 42 tablets"
    assert final_answer(ref) == "42 tablets"
    assert score("cot", "6 a day, for 7 days.\nAnswer: 42 tablets", ref).score == 1.0
    assert score("cot", "Answer: 40 tablets", ref).score == 0.0
    assert not score("cot", "42 tablets", ref).parsed
    assert score("cot", "Answer: yes", "so...\nAnswer: Yes").score == 1.0


def test_reference_the_metric_cannot_read_is_a_user_error():
    with pytest.raises(UserError, match="numeric metric: the reference has no number"):
        score("numeric", "Answer: 3", "Answer: none")
    with pytest.raises(UserError, match="json metric"):
        score("json", "{}", "not json")


def test_report_files(tmp_path, trained_run, memorized_chats):
    """A real evaluation of the memorising run: merged and bf16 GGUF answer the training prompts word
    for word (exact = 1), the untrained base does not; report.md, report.json and the chart are written."""
    run_dir, _ = trained_run
    variants = run_variants(run_dir)
    assert variants[:3] == ["base", "adapter", "merged"] and run_dir / "gguf" / "memorize-bf16.gguf" in variants
    assert (run_dir / "gguf" / "imatrix.gguf").is_file() and run_dir / "gguf" / "imatrix.gguf" not in variants
    report = evaluate(run_dir, memorized_chats, "exact", ["base", "adapter", "merged",
                                                          run_dir / "gguf" / "memorize-bf16.gguf"],
                      base=str(tiny_model_dir()),
                      max_new_tokens=64, out_dir=tmp_path)
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows["merged"]["score"] == 1.0 and rows["memorize-bf16.gguf"]["score"] == 1.0
    assert rows["adapter"]["score"] == 1.0  # base + LoRA, unmerged (PEFT)
    assert rows["memorize-bf16.gguf"]["stopped"] == 1.0 and rows["base"]["score"] == 0.0
    assert json.loads((tmp_path / "report.json").read_text())["examples"] == len(memorized_chats)
    # 4 of 4 right: exact interval [0.025^(1/4), 1]; paired differences on the same 4 prompts
    assert rows["merged"]["score_interval"] == [pytest.approx(0.025 ** 0.25, abs=1e-4), 1.0]
    # 4 wins in 4 cannot rule out "no difference": lo = 0.0125^(1/4) - (1 - 0.0125^(1/4)) (Bonferroni halves)
    assert rows["merged"]["vs_base"]["value"] == 100
    assert rows["merged"]["vs_base"]["lo"] == pytest.approx(100 * (2 * 0.0125 ** 0.25 - 1), abs=0.01)
    gguf = rows["memorize-bf16.gguf"]["vs_merged"]
    assert gguf["value"] == 0 and gguf["lo"] < 0 < gguf["hi"] and "vs_merged" not in rows["merged"]
    assert "| merged | 1.000 [0.398, 1.000] | 100.0 [" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "scores.png").stat().st_size > 5000
    assert "memorize-bf16.gguf" in table(report)


def test_the_report_warns_when_auto_chose_a_file_on_these_examples(tmp_path):
    from fasttune import rundir
    from fasttune.evaluate import chosen_on_these

    auto = {"decided_by": "task", "winner": "m-q6_k.gguf", "choice_examples": 900, "eval_examples": 1800}
    (tmp_path / "gguf").mkdir()
    rundir.write_json(tmp_path / "gguf" / "auto.json", auto)
    files = ["m-bf16.gguf", "m-q6_k.gguf"]
    assert chosen_on_these(tmp_path, files) == [
        "Note: m-q6_k.gguf was chosen by --quants auto on 900 of these 1800 examples, so its score here is biased "
        "up by that choice; its score on the other 900: gguf/auto.md."]
    assert chosen_on_these(tmp_path, files[:1]) == []  # the winner is not among the files evaluated
    rundir.write_json(tmp_path / "gguf" / "auto.json", dict(auto, decided_by="kl"))
    assert chosen_on_these(tmp_path, files) == []  # KL chose: the eval examples took no part


def test_answers_stop_at_the_end_of_turn_whatever_the_tokenizer_calls_eos(trained_run, memorized_chats):
    """A base checkpoint's tokenizer says eos = <|endoftext|> (Qwen2.5-0.5B's): the merged model's answers
    must still end at <|im_end|>, the token training taught, not run on to max_new_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttune.evaluate import answer_hf

    run_dir, _ = trained_run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    tokenizer.eos_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    answers = answer_hf(model, tokenizer, [ex.messages[:-1] for ex in memorized_chats], max_new_tokens=64)
    assert all(a.stopped for a in answers)
    assert [a.text for a in answers] == [ex.messages[-1]["content"] for ex in memorized_chats]
