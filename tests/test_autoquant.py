"""--quant auto: the selection rule on hand-made rows; the export that writes, measures once and keeps one."""

import contextlib
import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from fasttune import cli, config, evaluate, export, infer, rundir
from fasttune.autoquant import CALIBRATED_CANDIDATES, CANDIDATES, pick
from fasttune.tiny import tiny_model_dir
from tests.conftest import only_the_bf16_gguf, run_script


def row(type_, size, score):
    return {"file": f"x-{type_}.gguf", "type": type_, "size_mb": size, "score": score}


def test_pick_keeps_the_smallest_within_tolerance():
    rows = [row("bf16", 100, 80.0), row("q8_0", 53, 80.0), row("q6_k", 41, 79.5), row("q4_k_m", 30, 60.0)]
    winner, why = pick(rows, tolerance=1.0)
    assert winner["type"] == "q6_k"
    assert "smallest file within 1 points" in why and "q4_k_m 60.0" in why
    assert pick(rows, tolerance=25)[0]["type"] == "q4_k_m"
    assert pick(rows, tolerance=0)[0]["type"] == "q8_0"  # equal to the reference is within
    # a quant that scores above the reference is within any tolerance
    assert pick([row("bf16", 100, 50.0), row("q4_k_m", 30, 55.0)], tolerance=0)[0]["type"] == "q4_k_m"


def test_pick_keeps_the_reference_when_every_quant_loses():
    winner, why = pick([row("bf16", 100, 80.0), row("q8_0", 53, 70.0)], tolerance=1.0)
    assert winner["type"] == "bf16" and why.startswith("no quant stayed within 1 points")


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """The shared run without its quants, for one test alone (each test changes it)."""
    work = tmp_path / "memorize"
    shutil.copytree(trained_run[0], work, ignore=only_the_bf16_gguf)
    return work


@pytest.fixture
def counted(monkeypatch):
    """Counts of llama.cpp loads and chat answers per GGUF file name while the test runs."""
    loads, chats = Counter(), Counter()
    real_load, real_chat = infer.load, infer.chat

    @contextlib.contextmanager
    def load(path, *args, **kwargs):
        loads[Path(kwargs.get("lora_path") or path).name] += 1
        with real_load(path, *args, **kwargs) as llm:
            yield llm

    def chat(llm, *args, **kwargs):
        chats[Path(llm.model_path).name] += 1
        return real_chat(llm, *args, **kwargs)

    monkeypatch.setattr(infer, "load", load)
    monkeypatch.setattr(infer, "chat", chat)
    return loads, chats


def test_export_auto_measures_every_candidate_once_and_keeps_one(run_copy, counted, capsys):
    cfg = config.load_run(run_copy)
    result = export.export_run(run_copy, cfg, ["auto"], tolerance=100)
    gguf_dir = run_copy / "gguf"
    auto = json.loads((gguf_dir / "auto.json").read_text())
    rows = auto["candidates"]
    assert [r["type"] for r in rows] == ["bf16", *CANDIDATES, *CALIBRATED_CANDIDATES]
    assert auto["measure"].startswith("task score x 100 on the run's eval examples")
    assert rows[0]["score"] == 100.0  # the memorizing run answers its four cases exactly
    for r in rows:
        assert r["size_mb"] > 0 and r["bits_per_weight"] > 0 and r["tokens_per_s"] > 0 and r["kl"] >= 0
    assert rows[0]["bits_per_weight"] == 16.0 and rows[1]["bits_per_weight"] == 8.5  # q8_0: 34 bytes / 32 weights
    assert all(r["calibrated"] for r in rows[2:])  # every k-quant went through the importance matrix
    # tolerance 100 lets every candidate through: the smallest wins, is kept, the rest are gone
    smallest = min(rows[1:], key=lambda r: r["size_mb"])
    assert auto["winner"] == smallest["file"] and (gguf_dir / smallest["file"]).is_file()
    assert (gguf_dir / f"Modelfile.{smallest['file'].removesuffix('.gguf')}").is_file()
    assert not (gguf_dir / "candidates").exists()
    assert sorted(p.name for p in gguf_dir.glob("*.gguf")) == sorted(
        ["memorize-bf16.gguf", smallest["file"], "imatrix.gguf"])
    # run.json lists what is there, by kind and type; the importance matrix is not a model
    assert [(p.name, t) for p, t in rundir.models(run_copy)] == [("memorize-bf16.gguf", "bf16"),
                                                                  (smallest["file"], smallest["type"])]
    assert [p.name for p, _ in rundir.files(run_copy, "imatrix")] == ["imatrix.gguf"]
    for name in ("auto.md", "auto.png", "report.json"):
        assert (gguf_dir / name).is_file(), name

    # Each file loaded once; answered once per eval prompt plus the one fidelity chat.
    loads, chats = counted
    names = [r["file"] for r in rows]
    assert loads == Counter({name: 1 for name in names}), loads
    assert chats == Counter({name: 1 + 4 for name in names}), chats
    # The final evaluation and the printed summary reuse those answers: no file is loaded again.
    files = [p for p, _ in result.files]
    report = evaluate.evaluate_run(run_copy, cfg, str(tiny_model_dir()), result.measured, files)
    cli.report_run(run_copy, result, SimpleNamespace(eval=None), report)
    assert loads == Counter({name: 1 for name in names}) and chats == Counter({name: 5 for name in names})
    # ... and show the same numbers auto decided on
    scores = {r["variant"]: r["score"] for r in report["variants"]}
    assert {f.name: 100 * scores[f.name] for f in files} == pytest.approx(
        {r["file"]: r["score"] for r in rows if r["file"] in scores}, abs=0.01)
    out = capsys.readouterr().out
    assert "quant chosen by measurement" in out and "<- chosen" in out


def test_export_auto_without_eval_data_scores_agreement_with_16_bit(run_copy):
    manifest = rundir.load(run_copy)
    del manifest["data"]["eval"]  # a run trained without --eval_data
    rundir.write_json(run_copy / rundir.MANIFEST, manifest)
    (run_copy / "data" / "eval.jsonl").unlink()
    run_script("export/gguf.py", run_copy, "--quant", "auto", "--tolerance", "0", "--no-imatrix")
    result = json.loads((run_copy / "gguf" / "auto.json").read_text())
    rows = result["candidates"]
    assert result["measure"].startswith("top-1 agreement with memorize-bf16.gguf")
    assert result["imatrix"] is None and [r["type"] for r in rows] == ["bf16", *CANDIDATES]
    assert all(r["score"] == r["top1"] for r in rows)
    # tolerance 0: the smallest file that agrees with bf16 everywhere, else bf16 itself
    winner = next(r for r in rows if r["chosen"])
    perfect = [r for r in rows[1:] if r["score"] == 100.0]
    assert winner == (min(perfect, key=lambda r: r["size_mb"]) if perfect else rows[0])
