"""The task recipes: their sample data is sound, their references are what their metric reads,
the calculator's answers are what the formulas give, and a recipe runs end to end."""

import json
import math
import re

import pytest

from fasttune import data
from fasttune.config import read_task
from fasttune.evaluate import METRICS, NUMBER
from fasttune import gguf_file
from tests.conftest import REPO, run_script

TASKS = ["clinical_qa", "closed_qa", "clinical_calculator", "multiple_choice", "summarization", "extraction_json",
         "reasoning_cot"]


def task(name) -> dict:
    return read_task(REPO / "recipes" / f"{name}.yaml")


def examples(name, split=""):
    d = task(name)
    path = REPO / "recipes" / "data" / f"{name}{split}.jsonl"
    loaded = data.load(path, data.Templates(d["user_template"], d["assistant_template"], d["system_prompt"]),
                       fmt="fields")
    assert not loaded.rejects and not loaded.notes, (path, loaded.rejects, loaded.notes)
    return loaded.examples


@pytest.mark.parametrize("name", TASKS)
def test_sample_data_is_clean_sized_and_held_out(name):
    train, held_out = examples(name), examples(name, "_eval")
    assert len(train) >= 40 and len(held_out) >= 12 + 3 * (name != "clinical_qa")
    prompts = {ex.messages[1]["content"] for ex in train}
    assert not prompts & {ex.messages[1]["content"] for ex in held_out}  # nothing evaluated was trained on
    assert len(prompts) == len(train)  # no duplicate prompts


@pytest.mark.parametrize("name", TASKS)
def test_references_score_full_marks_with_the_recipes_metric(name):
    d = task(name)
    metric = METRICS[d.get("metric", "exact")]
    for ex in examples(name) + examples(name, "_eval"):
        reference = ex.messages[-1]["content"]
        if name != "clinical_qa":  # the first user's own template: the answer opens with "Summary:" itself
            assert d["user_template"].endswith(":")  # the prompt ends with its cue
        s = metric(reference, reference, d.get("tolerance", 0.02))
        assert s.parsed and s.score == pytest.approx(1.0), (ex.source, reference)


FORMULAS = {  # the textbook formulas, written independently of the data
    "Body mass index (BMI)": lambda i: i["weight_kg"] / (i["height_cm"] / 100) ** 2,
    "Mean arterial pressure (MAP)": lambda i: (i["sbp"] + 2 * i["dbp"]) / 3,
    "Anion gap": lambda i: i["sodium"] - (i["chloride"] + i["bicarbonate"]),
    "Corrected calcium for albumin": lambda i: i["calcium_mg_dl"] + 0.8 * (4.0 - i["albumin_g_dl"]),
    "Creatinine clearance (Cockcroft-Gault)": lambda i: (140 - i["age"]) * i["weight_kg"] / (72 * i["creatinine_mg_dl"])
    * (0.85 if i["sex"] == "female" else 1.0),
}


@pytest.mark.parametrize("split", ["", "_eval"])
def test_calculator_results_are_the_formulas(split):
    records = [json.loads(line) for line in (REPO / "recipes" / "data" / f"clinical_calculator{split}.jsonl").open()]
    assert set(r["calculation"] for r in records) == set(FORMULAS)
    for r in records:
        want = FORMULAS[r["calculation"]](r["inputs"])
        assert math.isclose(float(r["result"]), want, abs_tol=0.051), (r["patient"], r["result"], want)
        for value in r["inputs"].values():  # every input is stated in the patient text the model sees
            assert re.search(rf"\b{re.escape(str(value))}\b", r["patient"], re.IGNORECASE), (r["patient"], value)


def test_cot_answers_follow_from_the_steps():
    for path in ["reasoning_cot.jsonl", "reasoning_cot_eval.jsonl"]:
        for line in (REPO / "recipes" / "data" / path).open():
            r = json.loads(line)
            last_number = NUMBER.findall(r["reasoning"].splitlines()[-1])[-1]
            assert float(last_number) == float(NUMBER.match(r["answer"]).group()), r
            for step in re.findall(r"= ([\d.]+) / ([\d.]+) = ([\d.]+)", r["reasoning"]):
                a, b, q = map(float, step)
                assert abs(a / b - q) < 0.051, (r["question"], step)


@pytest.mark.parametrize("name", TASKS[1:])
def test_inspect_shows_the_mask_for_each_recipe(tmp_path, name):
    proc = run_script(f"recipes/{name}.py", "--model", "tiny", "--data", f"recipes/data/{name}.jsonl",
                      "--out", tmp_path / "run", "--inspect", "--inspect_examples", "1")
    assert (tmp_path / "run" / "inspect" / "mask.html").is_file()
    assert "examples kept" in proc.stdout + proc.stderr


def test_extraction_recipe_end_to_end(tmp_path):
    """A recipe other than clinical_qa, trained, exported, verified and evaluated with its own metric."""
    out = tmp_path / "extract"
    eval_data = tmp_path / "eval.jsonl"  # 6 of the 16 held-out cases: three variants answer each (time)
    eval_data.write_text("".join((REPO / "recipes/data/extraction_json_eval.jsonl").read_text().splitlines(True)[:6]))
    proc = run_script("recipes/extraction_json.py", "--model", "tiny", "--data", "recipes/data/extraction_json.jsonl",
                      "--eval_data", eval_data, "--out", out, "--epochs", "1", "--lora_r", "8",
                      "--learning_rate", "3e-3", "--quants", "q8_0", "--max_new_tokens", "32")
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["metric"] == "json" and report["examples"] == 6
    assert [r["variant"] for r in report["variants"]] == ["base", "merged", "extract-q8_0.gguf"]
    for row in report["variants"]:
        assert 0 <= row["score"] <= 1 and 0 <= row["unparseable"] <= 1
    assert "evaluation on 6 held-out examples" in proc.stdout and "extract-q8_0.gguf" in proc.stdout
    assert gguf_file.read(out / "gguf" / "extract-q8_0.gguf").fields["general.finetune"] == "extraction_json"
    # the same evaluation again from the run directory, limited, through export/eval.py
    proc = run_script("export/eval.py", out, "--variants", "merged", out / "gguf" / "extract-q8_0.gguf",
                      "--limit", "4", "--out", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["examples"] == 4 and len(again["variants"]) == 2 and "extract-q8_0.gguf" in proc.stdout
