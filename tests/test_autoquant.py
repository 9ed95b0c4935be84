"""--quant auto: the selection rule on hand-made rows; the export that writes, measures once and keeps one."""

import contextlib
import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from fasttune import autoquant, cli, config, evaluate, export, infer, quantize, rundir
from fasttune.autoquant import CANDIDATES, examples_needed, pick, split
from fasttune.mix import MIXES
from fasttune.tiny import tiny_model_dir
from tests.conftest import only_the_bf16_gguf, run_script


def row(type_, size, kl):
    return {"file": f"x-{type_}.gguf", "type": type_, "size_mb": size, "kl": kl, "top1": 100 - 100 * kl,
            "bits_per_weight": round(16 * size / 100, 2)}


def table(*entries):
    """bf16 at 100 MB first, then (type, MB, KL) per candidate."""
    return [row("bf16", 100, 0.0)] + [row(*e) for e in entries]


LADDER = [("q8_0", 53, 0.002), ("q6_k", 41, 0.006), ("q5_k_m", 38, 0.012), ("q4_k_m", 30, 0.05), ("q3_k_m", 29.5, 0.3)]


def test_kl_decides_when_the_eval_set_cannot_resolve_the_tolerance():
    """Budget 10 x q8_0's KL = 0.02: q8_0, q6_k, q5_k_m qualify; q5_k_m is under 10 % smaller than q6_k."""
    rows = table(*LADDER)
    winner, why = pick(rows, tolerance=1.0, n_eval=12)
    assert winner["type"] == "q6_k"
    assert [r["qualifies"] for r in rows[1:]] == [True, True, True, False, False]
    assert "not 10 % smaller than q6_k" in rows[3]["verdict"] and rows[4]["verdict"] == "KL over the budget"
    assert why.startswith("x-q6_k.gguf is within the KL budget of 10 x q8_0's divergence from x-bf16.gguf (0.02): "
                          "KL 0.006, and no other such file is at least 10 % smaller")
    assert ("at best, 6 of the 12 eval examples can show a file loses less than 51.8 points; deciding at 1 takes "
            "about 1750 eval examples") in why
    assert "no eval data" in pick(table(*LADDER), tolerance=1.0, n_eval=0)[1]


def test_a_file_barely_smaller_loses_to_the_more_faithful_one():
    """The demo's case: q3_k_m 1 % smaller than q6_k, ten times its KL; both within a wide budget."""
    rows = table(("q8_0", 48.5, 0.05), ("q6_k", 38.8, 0.02), ("q3_k_m", 38.4, 0.36))
    assert pick(rows, tolerance=1.0)[0]["type"] == "q6_k"
    # ties in KL: the smaller of equally faithful files is taken first
    rows = table(("q8_0", 53, 0.01), ("q6_k", 41, 0.01), ("q5_k_m", 40, 0.01))
    assert pick(rows, tolerance=1.0)[0]["type"] == "q5_k_m"
    assert rows[1]["verdict"] == "KL within the budget; not 10 % smaller than q5_k_m"
    # a file that qualified and was replaced says by what
    rows = table(*LADDER)
    pick(rows, tolerance=1.0)
    assert rows[1]["verdict"] == "KL within the budget; replaced by q6_k, at least 10 % smaller"


def test_without_q8_0_nothing_qualifies_by_kl():
    rows = table(("q4_k_m", 30, 0.05))
    winner, why = pick(rows, tolerance=1.0, n_eval=0)
    assert winner["type"] == "bf16" and why.startswith("no quant was measured against q8_0: keeping x-bf16.gguf")


def test_kl_ratio_and_when_screening_may_stop():
    """A file's KL / q8_0's, summed per conversation, and whether its 99 % interval over conversations
    has left the budget of 10 behind."""
    q8 = [0.01] * 400
    assert autoquant.kl_ratio(q8, [0.3] * 20) == pytest.approx(30)
    assert autoquant.settled(q8, [0.3] * 20) and autoquant.settled(q8, [0.02] * 20)  # clearly over, clearly within
    assert not autoquant.settled(q8, [0.0, 0.2] * 10)  # 10 x on average: more conversations could tip it
    one = [0.0] * 9 + [2.0]  # 20 x q8_0, all of it in one conversation of ten
    assert autoquant.kl_ratio(q8, one) == pytest.approx(20) and not autoquant.settled(q8, one)
    assert not autoquant.settled(q8, one * 4) and autoquant.settled(q8, one * 40)  # 40 conversations, 400
    value, lo, hi = autoquant.kl_ratio(q8, one * 4, 0.95)
    assert lo < value < hi and autoquant.kl_ratio(q8, one * 4, 0.95) == (value, lo, hi)  # seeded
    assert not autoquant.settled(q8, [0.3] * 19)  # under 20 conversations the bootstrap is too narrow to stop on
    assert autoquant.kl_ratio(q8, [0.3], 0.95)[0] == pytest.approx(30)  # one conversation: a ratio, no interval
    assert all(x != x for x in autoquant.kl_ratio(q8, [0.3], 0.95)[1:])
    assert autoquant.kl_ratio(q8[:10], q8[:5]) == 1.0  # the yardstick's first conversations only
    # what a row records: no interval from fewer conversations than screening would stop on
    assert autoquant.ratio_fields(q8, [0.3] * 19) == {"kl_ratio": 30.0, "kl_ratio_interval": None}
    assert autoquant.ratio_fields(q8, [0.3] * 20)["kl_ratio_interval"] == [30.0, 30.0]
    assert autoquant.kl_ratio([0.0, 0.0], [0.0, 0.0]) == 0.0 and autoquant.kl_ratio([0.0], [0.1]) == float("inf")


def test_kl_qualifies_by_the_upper_end_of_the_ratio_interval():
    """A ratio of 9 whose interval reaches 18 may be over the budget: the file does not qualify, and
    the verdict says why; the same ratio with a tight interval does."""
    rows = table(*LADDER[:2], ("q4_k_m", 30, 0.018))
    rows[3].update(kl_ratio=9.0, kl_ratio_interval=[4.7, 18.5])
    winner, _ = pick(rows, tolerance=1.0, n_eval=12)
    assert not rows[3]["qualifies"] and winner["type"] == "q6_k"
    assert rows[3]["verdict"] == "KL may be over the budget (the upper end of its interval is)"
    rows[3]["kl_ratio_interval"] = [8.1, 9.9]
    assert pick(rows, tolerance=1.0, n_eval=12)[0]["type"] == "q4_k_m"
    # a file whose logits were not finite: least faithful, never chosen, and the order of the rest holds
    rows = table(("q8_0", 53, 0.002), ("q4_k_m", 30, float("nan")), ("q6_k", 41, 0.006))
    assert [r["type"] for r in autoquant.order(rows)] == ["q8_0", "q6_k", "q4_k_m"]
    assert pick(rows, tolerance=1.0, n_eval=12)[0]["type"] == "q6_k" and not rows[2]["qualifies"]


def test_a_screened_file_is_judged_by_its_ratio_on_the_positions_it_was_measured_on():
    """q3_k_m's KL over its first 64 positions reads within 10 x q8_0's KL over all 512, but on those
    same 64 positions it is 15 x q8_0's: over the budget, and ordered after q4_k_m."""
    rows = table(*LADDER[:4], ("q3_k_m", 29.5, 0.015))
    rows[5]["kl_ratio"] = 15.0
    winner, _ = pick(rows, tolerance=1.0, n_eval=12)
    assert [r["qualifies"] for r in rows[1:]] == [True, True, True, False, False] and winner["type"] == "q6_k"
    assert [r["type"] for r in autoquant.order(rows)] == ["q8_0", "q6_k", "q5_k_m", "q3_k_m", "q4_k_m"]
    assert autoquant.frontier(rows)[0] == "x-q3_k_m.gguf"  # the smallest file is always on it
    del rows[5]["kl_ratio"]
    assert pick(rows, tolerance=1.0, n_eval=12)[0]["type"] == "q3_k_m"  # by KL alone it would have won


def scores(n, wrong=()):
    return [0.0 if i in wrong else 1.0 for i in range(n)]


def test_the_task_decides_by_the_lower_end_of_the_paired_interval():
    """500 choice examples: a file that loses no example qualifies; one that loses 10 (2 points) may not."""
    rows = table(*LADDER)
    choice = {"x-bf16.gguf": scores(500), "x-q8_0.gguf": scores(500), "x-q6_k.gguf": scores(500, wrong={1}),
              "x-q5_k_m.gguf": scores(500), "x-q4_k_m.gguf": scores(500, wrong=set(range(10))),
              "x-q3_k_m.gguf": scores(500, wrong=set(range(60)))}
    winner, why = pick(rows, tolerance=1.0, choice=choice)
    # tested from the most faithful down, stopping at the first that fails: q5_k_m is not tested
    assert [r["qualifies"] for r in rows[1:]] == [True, False, False, False, False]
    assert rows[2]["difference"]["lo"] < -1 < rows[1]["difference"]["lo"]  # one loss in 500 cannot show < 1 point
    assert rows[3]["verdict"] == "not tested: q6_k, more faithful, was not shown within"
    assert winner["type"] == "q8_0" and "on 500 eval examples" in why
    # all pass (a tolerance of 100 points): from the most faithful down, 10 % steps
    winner, _ = pick(table(*LADDER), tolerance=100, choice=choice)
    assert winner["type"] == "q4_k_m"  # q3_k_m is 1.7 % smaller than q4_k_m
    # all fail: the reference stays
    every = {name: scores(500, wrong=set(range(100))) for name in choice}
    every["x-bf16.gguf"] = scores(500)
    winner, why = pick(table(*LADDER), tolerance=1.0, choice=every)
    assert winner["type"] == "bf16" and why.startswith("no quant was shown to lose less than 1 points")


def test_split_and_how_many_examples_a_decision_takes():
    assert split(12, 1.0, seed=0) == ([], list(range(12)))  # 6 cannot resolve 1 point: KL decides, all 12 report
    assert split(1000, 1.0, seed=0)[0] == []  # 500 could show < 0.87 points at best: not half the tolerance
    choice, report = split(4000, 1.0, seed=3)
    assert len(choice) == len(report) == 2000 and sorted(choice + report) == list(range(4000))
    assert split(4000, 1.0, seed=3) == (choice, report) and split(4000, 1.0, seed=4) != (choice, report)
    assert split(40, 40.0, seed=0)[0]  # a wide tolerance: 20 examples resolve it
    n = examples_needed(1.0)
    assert 1500 < n < 2000 and split(n, 1.0, 0)[0] and not split(n - 2, 1.0, 0)[0]
    assert split(1, 100.0, 0) == ([], [0]) and split(0, 1.0, 0) == ([], [])


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
        loads[infer.model_name(path, kwargs.get("lora_path"))] += 1
        with real_load(path, *args, **kwargs) as llm:
            yield llm

    def chat(llm, *args, **kwargs):
        chats[infer.model_name(llm.model_path, llm.lora_path)] += 1
        return real_chat(llm, *args, **kwargs)

    monkeypatch.setattr(infer, "load", load)
    monkeypatch.setattr(infer, "chat", chat)
    return loads, chats


def test_export_auto_measures_each_file_once_and_keeps_one(run_copy, counted, capsys):
    """The default tolerance on the run's 4 eval examples: they cannot resolve 1 point, so KL decides,
    no candidate answers the eval prompts, the files kept answer all 4, and the winner's score is
    reported on all 4 (none took part in the choice)."""
    cfg = config.load_run(run_copy)
    result = export.export_run(run_copy, cfg, ["auto"], base=str(tiny_model_dir()))
    gguf_dir = run_copy / "gguf"
    auto = json.loads((gguf_dir / "auto.json").read_text())
    rows = auto["candidates"]
    # llama.cpp's ladder from the most bits down to the first type that does not qualify (all of it
    # when each does), the mixes when it reached q4_k_m; every other candidate is listed as not written
    ladder = [r["type"] for r in rows if r["type"] in CANDIDATES]
    mixes = list(MIXES) if "q4_k_m" in ladder else []
    assert [r["type"] for r in rows] == ["bf16", *ladder, *mixes, "q4_k_m+lora"] and ladder == CANDIDATES[:len(ladder)]
    assert set(auto["not_written"]) == set(CANDIDATES[len(ladder):]) | set(MIXES).difference(mixes)
    pair = rows[-1]
    assert pair["file"] == "base-q4_k_m.gguf + memorize-lora.gguf" and auto["no_pair"] is None
    assert pair["size_mb"] > pair["adapter_mb"] > 0  # both files counted
    front = [next(r for r in rows if r["file"] == f) for f in auto["frontier"]]  # smallest first, KL falling
    assert [r["size_mb"] for r in front] == sorted(r["size_mb"] for r in front)
    assert all(a["kl"] > b["kl"] for a, b in zip(front, front[1:])) and front[-1]["type"] == "bf16"
    assert all(any(f["size_mb"] <= r["size_mb"] and f["kl"] <= r["kl"] for f in front) for r in rows)
    assert auto["decided_by"] == "kl" and auto["choice_examples"] == 0 and auto["eval_examples"] == 4
    assert "at best, 2 of the 4 eval examples can show a file loses less than" in auto["why"]
    assert rows[0]["score"] == 100.0  # the memorizing run answers its four cases exactly
    for r in rows:
        assert r["size_mb"] > 0 and r["bits_per_weight"] > 0 and r["kl"] >= 0 and "difference" not in r
    assert rows[0]["bits_per_weight"] == 16.0 and rows[1]["bits_per_weight"] == 8.5  # q8_0: 34 bytes / 32 weights
    assert all(r["calibrated"] for r in rows[2:])  # every k-quant went through the importance matrix
    # KL / q8_0's on the same positions. 4 training conversations: under the first look, none screened,
    # and too few for an interval, so the ratio alone is held against the budget
    assert rows[1]["kl_ratio"] == 1.0 and all(r["drift_positions"] == rows[1]["drift_positions"] for r in rows)
    for r in rows[1:]:
        assert r["kl_ratio"] == pytest.approx(r["kl"] / rows[1]["kl"], rel=1e-3) and r["kl_ratio_interval"] is None
    assert [r["qualifies"] for r in rows[1:]] == [r["kl_ratio"] <= autoquant.KL_BUDGET for r in rows[1:]]
    assert all(r["qualifies"] for r in rows if r["type"] in ladder[:-1])
    assert ladder[-1] == CANDIDATES[-1] or not rows[len(ladder)]["qualifies"]
    winner = next(r for r in rows if r["chosen"])
    assert winner["type"] != "bf16" and winner["qualifies"] and auto["winner"] == winner["file"]
    assert auto["held_out"]["examples"] == 4 and auto["held_out"]["winner"]["n"] == 4
    measured = {r["file"]: r for r in json.loads((gguf_dir / "report.json").read_text())["files"]}
    assert measured[winner["file"]]["score"] == auto["held_out"]["winner"]["value"]  # all 4, after the choice
    assert measured[winner["file"]]["score_examples"] == 4
    assert all("score" not in r for name, r in measured.items() if name not in (winner["file"], rows[0]["file"]))
    assert (gguf_dir / winner["file"]).is_file(), "the tiny run's winner is a single file, not the pair"
    assert (gguf_dir / f"Modelfile.{winner['file'].removesuffix('.gguf')}").is_file()
    assert not (gguf_dir / "candidates").exists() and not (gguf_dir / "lora").exists()
    assert sorted(p.name for p in gguf_dir.glob("*.gguf")) == sorted(
        ["memorize-bf16.gguf", winner["file"], "imatrix.gguf"])
    # run.json lists what is there, by kind and type; the importance matrix is not a model
    assert [(p.name, t) for p, t in rundir.models(run_copy)] == [("memorize-bf16.gguf", "bf16"),
                                                                  (winner["file"], winner["type"])]
    assert [p.name for p, _ in rundir.files(run_copy, "imatrix")] == ["imatrix.gguf"]
    for name in ("auto.md", "auto.png", "report.json"):
        assert (gguf_dir / name).is_file(), name
    assert "On 4 eval examples that took no part in the choice" in (gguf_dir / "auto.md").read_text()

    # One load per file, the winner once more for the eval prompts and its fidelity to the merged
    # model; only the files kept answer the fidelity chat and the 4 eval prompts.
    loads, chats = counted
    names = [r["file"] for r in rows]
    kept = {"memorize-bf16.gguf", winner["file"]}
    assert loads == Counter({name: 1 + (name == winner["file"]) for name in names}), loads
    assert chats == Counter({name: 5 for name in kept}), chats
    assert {r["file"] for r in measured.values() if "tokenization_identical" in r} == kept
    # The final evaluation and the printed summary reuse those answers: no file is loaded again.
    before = (Counter(loads), Counter(chats))
    files = [p for p, _ in result.files]
    report = evaluate.evaluate_run(run_copy, cfg, str(tiny_model_dir()), result.measured, files)
    cli.report_run(run_copy, result, SimpleNamespace(eval=None), report)
    assert (loads, chats) == before
    # ... and show the same numbers the files were measured with
    scores = {r["variant"]: r["score"] for r in report["variants"]}
    assert {f.name: 100 * scores[f.name] for f in files} == pytest.approx(
        {name: r["score"] for name, r in measured.items() if name in scores}, abs=0.01)
    out = capsys.readouterr().out
    assert "quant chosen by measurement" in out and "<- chosen" in out


def test_when_kl_decides_nothing_past_the_first_type_that_fails_is_written(run_copy, counted, monkeypatch):
    """A budget under q8_0's own KL (ratio 1): q8_0, the ladder's first type, does not qualify, so no
    smaller type of the ladder is written or loaded, nor the mixes of its q4_k_m, and auto.md and the
    printed table say which and why. A type listed with --quants (q4_k_m) is written and measured all
    the same, and stays a candidate; the pair is another route and is measured."""
    monkeypatch.setattr(autoquant, "KL_BUDGET", 0.5)
    cfg = config.load_run(run_copy)
    cfg.export.verify = False  # fidelity: the test above
    export.export_run(run_copy, cfg, ["q4_k_m", "auto"], base=str(tiny_model_dir()))
    auto = autoquant.load(run_copy)
    assert [r["type"] for r in auto["candidates"]] == ["bf16", "q4_k_m", "q8_0", "q4_k_m+lora"]
    skipped = [q for q in [*CANDIDATES, *MIXES] if q not in ("q8_0", "q4_k_m")]
    assert auto["not_written"] == {q: "q8_0, with more bits, does not qualify" for q in skipped}
    loads, _ = counted
    assert set(loads) == {"memorize-bf16.gguf", "memorize-q4_k_m.gguf", "memorize-q8_0.gguf",
                          "base-q4_k_m.gguf + memorize-lora.gguf"}
    assert f"{', '.join(skipped)} (q8_0, with more bits, does not qualify)" in (run_copy / "gguf" / "auto.md").read_text()
    assert autoquant.table(auto).endswith(autoquant.not_written_line(auto))  # what the recipe prints says so too


def test_when_the_task_decides_the_halves_stay_apart(tmp_path, monkeypatch):
    """export._choose with measurements made up so that the two halves disagree: the candidates answer
    the choosing half in KL order and none after the first that fails, the choice sees only that half,
    the report only the other, and the winner fills in only what it lacked."""
    from fasttune import measure

    n, tol = 8, 100.0
    monkeypatch.setattr(autoquant, "RESOLVE", 1.0)  # 4 examples resolve 100 points (88.8)
    choice_at, report_at = autoquant.split(n, tol, seed=1)
    assert choice_at and not set(choice_at) & set(report_at)
    files = [(tmp_path / f"m-{q}.gguf", q) for q in ("bf16", "q3_k_m", "q4_k_m", "q8_0")]
    truth = {"m-bf16.gguf": [1.0] * n,  # right on every example
             "m-q8_0.gguf": [1.0 if i in choice_at else 0.0 for i in range(n)],  # right only where it is chosen
             "m-q4_k_m.gguf": [0.0] * n, "m-q3_k_m.gguf": [1.0] * n}
    measured = {}
    for (path, q), size, kl in zip(files, (100, 25, 30, 53), (0.0, 0.9, 0.5, 0.001)):
        m = measure.Measured({"file": path.name, "type": q, "size_mb": size, "bits_per_weight": 1, "kl": kl,
                              "top1": 100})
        if q == "bf16":  # the reference answered every prompt while it was measured
            m.answers, m.scores = [object()] * n, list(truth[path.name])
        measured[path.name] = m
    asked = []

    def answer(path, task, indices, into, adapter=None, fidelity=False):
        if not into.answers:
            into.answers, into.scores = [None] * n, [None] * n
        todo = [i for i in indices if into.answers[i] is None]
        if todo:
            asked.append((path.name, todo))
        for i in todo:
            into.answers[i], into.scores[i] = object(), truth[path.name][i]

    monkeypatch.setattr(measure, "answer", answer)
    monkeypatch.setattr(export.measure, "answer", answer)
    task = SimpleNamespace(prompts=[[]] * n)
    (tmp_path / "gguf").mkdir()
    options = {p.name: (p, q, None) for p, q in files}
    decision = export._choose(tmp_path, options, export.Result(files[:1], measured), task, tol, None,
                              choice_at, report_at, no_pair="none here", not_written={})
    assert decision["decided_by"] == "task" and decision["winner"] == "m-q8_0.gguf"
    # q8_0 passes, q4_k_m fails and ends the test: q3_k_m (less faithful, though right everywhere) never answers
    assert asked == [("m-q8_0.gguf", choice_at), ("m-q4_k_m.gguf", choice_at), ("m-q8_0.gguf", report_at)]
    rows = {r["file"]: r for r in decision["candidates"]}
    assert rows["m-q3_k_m.gguf"]["verdict"] == "not tested: q4_k_m, more faithful, was not shown within"
    assert decision["held_out"]["winner"]["value"] == 0  # wrong on every example it was not chosen on
    assert decision["held_out"]["difference"]["value"] == -100 and decision["held_out"]["examples"] == len(report_at)
    assert measured["m-q4_k_m.gguf"].answers.count(None) == len(report_at)  # a loser never sees the other half
    assert "scores 0.0 [" in (tmp_path / "gguf" / "auto.md").read_text()


def test_export_auto_without_eval_data_decides_by_kl(run_copy):
    manifest = rundir.load(run_copy)
    del manifest["data"]["eval"]  # a run trained without --eval_data
    rundir.write_json(run_copy / rundir.MANIFEST, manifest)
    (run_copy / "data" / "eval.jsonl").unlink()
    shutil.rmtree(run_copy / "adapter")  # a run copied without it: no mixes, no pair, and auto says so
    config_yaml = run_copy / "config.yaml"  # fidelity to the merged model: the test above covers it
    config_yaml.write_text(config_yaml.read_text().replace("verify: true", "verify: false"))
    run_script("export/gguf.py", run_copy, "--quant", "auto", "--tolerance", "0", "--no-imatrix")
    result = json.loads((run_copy / "gguf" / "auto.json").read_text())
    rows = result["candidates"]
    assert result["decided_by"] == "kl" and "no eval data" in result["why"] and "held_out" not in result
    plain = [q for q in CANDIDATES if q not in quantize.NEEDS_IMATRIX]  # no importance matrix: no i-quants, no q2_k
    assert result["imatrix"] is None and [r["type"] for r in rows] == ["bf16", *plain][:len(rows)]
    assert set(result["not_written"]) == set(plain[len(rows) - 1:])
    assert len(rows) - 1 == len(plain) or not rows[-1]["qualifies"]  # the walk stops at the first that fails
    assert result["no_pair"] == "the run has no adapter/"
    assert "No such pair was measured: the run has no adapter/." in (run_copy / "gguf" / "auto.md").read_text()
    assert all("score" not in r and r["kl"] >= 0 for r in rows) and rows[0]["kl"] == 0
    assert [r["qualifies"] for r in rows[1:]] == [r["kl_ratio"] <= autoquant.KL_BUDGET for r in rows[1:]]
    winner = next(r for r in rows if r["chosen"])
    assert winner["type"] != "bf16" and winner["qualifies"]  # q8_0 is always within its own budget
    assert "No eval data: the chosen file's task score is not measured." in (run_copy / "gguf" / "auto.md").read_text()


def test_reports_on_constructed_decisions(tmp_path):
    """auto.md, auto.json and auto.png for the cases a run can end in: the reference kept (never
    compared with itself), KL with one eval example, no q8_0 to set the budget, q8_0 at KL 0."""
    (tmp_path / "gguf").mkdir()
    kept = autoquant.choose(table(("q8_0", 53, 0.002)), 1.0, None, None, 1)  # q8_0 wins: 53 <= 90
    assert kept["winner"] == "x-q8_0.gguf" and kept["why"].endswith("one eval example cannot be halved")
    no_q8 = autoquant.choose(table(("q4_k_m", 30, 0.05)), 1.0, None, None, 3)
    assert no_q8["winner"] == "x-bf16.gguf"
    result = autoquant.report(tmp_path, no_q8, ([1.0, 0.0, 1.0], [1.0, 0.0, 1.0]))
    assert "winner" not in result["held_out"] and "difference" not in result["held_out"]
    md = (tmp_path / "gguf" / "auto.md").read_text()
    assert "x-bf16.gguf scores 66.7 [" in md and "difference" not in md.split("\n")[4]
    assert (tmp_path / "gguf" / "auto.png").stat().st_size > 5000
    zero = autoquant.choose(table(("q8_0", 53, 0.0), ("q6_k", 41, 0.0), ("q4_k_m", 30, 0.01)), 1.0, None, None, 0)
    assert zero["winner"] == "x-q6_k.gguf" and "no eval data" in zero["why"]  # budget 0: KL 0 only
    autoquant.report(tmp_path, zero, None)
    assert "No eval data: the chosen file's task score is not measured." in (tmp_path / "gguf" / "auto.md").read_text()


def test_the_frontier_is_the_files_no_smaller_file_beats_on_kl():
    rows = table(*LADDER) + [dict(row("q4_k_m+lora", 35, 0.004), file="base-q4_k_m.gguf + x-lora.gguf")]
    assert autoquant.frontier(rows) == ["x-q3_k_m.gguf", "x-q4_k_m.gguf", "base-q4_k_m.gguf + x-lora.gguf",
                                        "x-q8_0.gguf", "x-bf16.gguf"]  # q5_k_m and q6_k: the pair is smaller and closer
    winner, _ = pick(rows, 1.0)  # KL decides (no eval): budget 0.02; q8_0, then the pair (35 <= 0.9 x 53)
    assert winner["file"] == "base-q4_k_m.gguf + x-lora.gguf"
