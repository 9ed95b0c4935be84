"""The export loop: the listed types, the GGUF LoRA pair, each listed in run.json and measured once."""

import json
import shutil
import subprocess
import sys

import pytest

from fasttune import config, export, measure, rundir
from tests.conftest import only_the_bf16_gguf, run_script
from tests.e2e.test_chat_serve import serving


def test_export_with_lora_writes_lists_measures_and_serves_the_pair(tmp_path, trained_run, tiny_dir, memorized_chats):
    run = tmp_path / "memorize"
    shutil.copytree(trained_run[0], run, ignore=only_the_bf16_gguf)
    cfg = config.load_run(run)
    cfg.data.system_prompt, cfg.eval.evaluate = "Be brief.", False
    result = export.export_run(run, cfg, ["q8_0"], base=str(tiny_dir), lora_gguf=True)
    assert [(p.name, t) for p, t in result.files] == [("memorize-q8_0.gguf", "q8_0")]
    adapter, base = rundir.lora_pair(run)
    assert (adapter.name, base.name) == ("memorize-lora.gguf", "base-q8_0.gguf")
    assert [e["type"] for _, e in rundir.files(run, "lora_base")] == ["q8_0"]
    modelfile = (run / "gguf" / "lora" / "Modelfile.memorize-lora").read_text()
    assert "FROM ./base-q8_0.gguf\nADAPTER ./memorize-lora.gguf\n" in modelfile and 'SYSTEM """Be brief."""' in modelfile
    q8 = result.measured["memorize-q8_0.gguf"].row
    assert "kl" not in q8  # no 16-bit file in this export: nothing to measure drift against
    pair = result.measured["base-q8_0.gguf + memorize-lora.gguf"].row
    assert pair["chat_finish_reason"] == "stop" and pair["top1_agreement"] > 0.9
    rows = {r["file"]: r for r in json.loads((run / "gguf" / "report.json").read_text())["files"]}
    assert rows[pair["file"]]["top1_agreement"] == pair["top1_agreement"] and rows["memorize-q8_0.gguf"]["kept"]
    assert rows[pair["file"]]["kept"]

    # chat and serve apply the adapter at load time: the base file alone does not know the answer, with it, it does
    messages = memorized_chats[0].messages
    ask = ["--system", messages[0]["content"], "--prompt", messages[1]["content"], "--max-tokens", "64"]
    with_lora = run_script("export/chat.py", base, "--lora", adapter, *ask).stdout.strip()
    assert with_lora == messages[-1]["content"]
    assert run_script("export/chat.py", base, *ask).stdout.strip() != messages[-1]["content"]
    with serving(tmp_path / "serve.log", base, "--lora", adapter) as (client, _):
        reply = client.chat.completions.create(model="mine", messages=messages[:-1], temperature=0, max_tokens=64)
    assert reply.choices[0].message.content.strip() == messages[-1]["content"]
    missing = run_script("export/chat.py", base, "--lora", tmp_path / "nope.gguf", *ask, check=False)
    assert missing.returncode == 2 and "--lora" in missing.stderr and "no such file" in missing.stderr


def test_the_stages_after_training_import_neither_the_data_loader_nor_the_training_stack():
    """They read the run (fasttune.rundir), not the user's files; export/*.py start without Unsloth or TRL."""
    code = ("import sys; import fasttune.export, fasttune.evaluate, fasttune.measure, fasttune.calibrate, "
            "fasttune.base_model; print(sorted(m for m in ('fasttune.data', 'fasttune.model', 'unsloth', 'trl') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_when_the_pair_wins_auto_keeps_it_and_every_later_stage_runs_it(tmp_path, trained_run, tiny_dir,
                                                                         memorized_chats, monkeypatch, capsys):
    """The decision rule with its constants set so the base + adapter pair must win (candidates: q8_0
    and the pair; any KL qualifies): the pair lands in gguf/lora/, run.json lists it, the final
    evaluation scores it with the answers export measured, and the printed chat command runs it."""
    from types import SimpleNamespace

    from fasttune import autoquant, cli, evaluate, mix

    monkeypatch.setattr(autoquant, "CANDIDATES", ["q8_0"])
    monkeypatch.setattr(mix, "MIXES", {})
    monkeypatch.setattr(autoquant, "KL_BUDGET", 1e9)
    run = tmp_path / "memorize"
    shutil.copytree(trained_run[0], run, ignore=only_the_bf16_gguf)
    cfg = config.load_run(run)
    cfg.export.verify = False  # fidelity: the test above
    result = export.export_run(run, cfg, ["auto"], base=str(tiny_dir))
    auto = autoquant.load(run)
    pair_name = "base-q4_k_m.gguf + memorize-lora.gguf"
    assert auto["winner"] == pair_name, auto["why"]  # q8_0 replaces bf16, the pair is 10 % smaller than q8_0
    adapter, base = rundir.lora_pair(run)
    assert (adapter.parent, base.parent) == (run / "gguf" / "lora",) * 2
    assert result.lora == [(adapter, base)] and [e["type"] for _, e in rundir.files(run, "lora_base")] == ["q4_k_m"]
    assert "ADAPTER ./memorize-lora.gguf" in (run / "gguf" / "lora" / "Modelfile.memorize-lora").read_text()
    assert sorted(p.name for p in (run / "gguf").glob("*.gguf")) == ["imatrix.gguf", "memorize-bf16.gguf"]
    assert not (run / "gguf" / "candidates").exists()
    assert evaluate.run_variants(run)[-1] == (base, adapter)  # export/eval.py evaluates it by default

    answers = result.measured[pair_name].answers
    assert len(answers) == 4 and None not in answers  # the winner answered every eval prompt
    monkeypatch.setattr(evaluate, "answer_gguf", None)  # the final evaluation reuses those answers: no GGUF reloads
    report = evaluate.evaluate_run(run, cfg, str(tiny_dir), result.measured, [p for p, _ in result.files],
                                   result.lora)
    row = next(r for r in report["variants"] if r["variant"] == pair_name)
    assert 100 * row["score"] == pytest.approx(result.measured[pair_name].row["score"], abs=0.01)
    assert row["vs_merged"]["n"] == 4

    cli.report_run(run, result, SimpleNamespace(eval=None), report)
    out = capsys.readouterr().out
    assert "quant chosen by measurement" in out and pair_name in out
    command = next(line for line in out.splitlines() if line.startswith("chat with it:"))
    assert command.split("export/chat.py ", 1)[1] == f"{base} --lora {adapter}"
    messages = memorized_chats[0].messages
    reply = run_script("export/chat.py", base, "--lora", adapter, "--system", messages[0]["content"],
                       "--prompt", messages[1]["content"], "--max-tokens", "64").stdout.strip()
    assert reply == messages[-1]["content"]  # the fine-tune survived the 4-bit base




def test_drift_and_fidelity_read_the_training_file_in_the_run_s_seeded_order(sorted_run):
    cfg = config.parse(["--model", "tiny", "--data", "d.jsonl", "--out", str(sorted_run), "--verify", "false"])
    measurer = export.measurer(sorted_run, cfg, None, drift=True, screen=False)
    prompts = [case.messages[-1]["content"] for case in measurer.drift_cases]
    assert sum(len(c.span) for c in measurer.drift_cases) == measure.MAX_POSITIONS  # read on until full
    assert prompts == [ex.messages[-2]["content"] for ex in rundir.in_seeded_order(sorted_run, "train")][:len(prompts)]
    # a KL pass may stop at the first look, after 20 conversations: both topics are in them
    assert {p.split()[0] for p in prompts[:20]} == {"dose", "bmi"}
