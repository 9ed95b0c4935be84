"""The measurement written next to every export (gguf/report.json): one row per file, everything in it."""

import json
import math

from tests.conftest import greedy_agrees


def test_report_next_to_the_export(trained_run):
    run_dir, proc = trained_run
    report = json.loads((run_dir / "gguf" / "report.json").read_text())
    rows = {row["file"]: row for row in report["files"]}
    assert set(rows) == {"memorize-bf16.gguf", "memorize-q4_k_m.gguf"}
    bf16, q4 = rows["memorize-bf16.gguf"], rows["memorize-q4_k_m.gguf"]
    for row in (bf16, q4):
        assert row["tokenization_identical"] and row["chat_finish_reason"] == "stop" and row["kept"]
        assert row["answer_positions"] > 4 and row["drift_positions"] >= row["answer_positions"]
        # the task, in the same load: the four memorised answers, each stopping by itself
        assert row["score"] > 90 and row["stopped"] == 1.0 and row["tokens_per_s"] > 0
    # drift from the 16-bit file: none for itself, some for q4_k_m (the same positions for both)
    assert (bf16["kl"], bf16["top1"]) == (0.0, 100.0) and q4["kl"] > 0
    # bf16: the same model up to llama.cpp's bf16 arithmetic
    assert greedy_agrees(bf16) and greedy_agrees(q4)
    assert bf16["logits_mean_abs_diff"] < 0.03 and bf16["top1_agreement"] > 0.95
    # bf16 moves the memorised answers' perplexity by well under 1 % (measured x1.000)
    assert abs(bf16["perplexity_ratio"] - 1) < 0.01
    # the report's own consistency: |log p_file(t) - log p_merged(t)| <= 2 max|d logits| at every position
    for row in (bf16, q4):
        assert abs(math.log(row["perplexity_ratio"])) <= 2 * row["logits_max_abs_diff"] + 1e-3
    # q4_k_m on a 256-wide model: visibly lossy, still the same model (sane bounds; measured x1.016, 100 %)
    assert 0.9 < q4["perplexity_ratio"] < 1.5 and q4["top1_agreement"] > 0.5
    assert q4["logits_mean_abs_diff"] > bf16["logits_mean_abs_diff"]
    assert "fidelity against the merged model" in proc.stdout and "memorize-q4_k_m.gguf: 38.6 MB (" in proc.stdout
    # real bits per weight: bf16 is 16; q4_k_m on this model keeps the 151,936-row embedding in q6_k
    assert abs(bf16["bits_per_weight"] - 16) < 0.01 and 4.5 < q4["bits_per_weight"] < 8


def test_logits_at_the_answer_span_are_those_of_a_full_pass(trained_run, tokenizer):
    """measure._logits runs the prompt without the output layer; the span's rows must not change."""
    import numpy as np

    from fasttune import infer, measure

    run_dir, _ = trained_run
    chats = [json.loads(line)["messages"] for line in (run_dir / "data" / "train.jsonl").read_text().splitlines()]
    case = measure.cases(tokenizer, chats)[0]
    assert case.span[0] > 0  # a prompt before the answer: the part computed without logits
    with infer.load(run_dir / "gguf" / "memorize-q4_k_m.gguf", n_ctx=512, logits_all=True) as llm:
        llm.reset()
        llm.eval(case.ids)
        full = np.array(llm.scores[: len(case.ids)], dtype=np.float32)[case.span]
        got = measure._logits(llm, case.ids, case.span)
        assert got.shape == full.shape
        np.testing.assert_allclose(got, full, atol=1e-3)
        # the next cases keep the cache of the prefix they share with the one before (the system prompt)
        evaluated, decode = [], llm._ctx.decode
        llm._ctx.decode = lambda batch: (evaluated.append(batch.batch.n_tokens), decode(batch))
        many = measure.cases(tokenizer, chats)
        after = [measure._logits(llm, c.ids, c.span) for c in many]
        llm._ctx.decode = decode
        for c, logits in zip(many, after):
            llm.reset()
            llm.eval(c.ids)
            np.testing.assert_allclose(logits, np.array(llm.scores[: len(c.ids)], dtype=np.float32)[c.span], atol=1e-3)
    with infer.load(run_dir / "gguf" / "memorize-q4_k_m.gguf", n_ctx=512, n_batch=8) as llm:  # cases in chunks
        for c, logits in zip(many, after):
            np.testing.assert_allclose(measure._logits(llm, c.ids, c.span), logits, atol=1e-3)
    shared = min(next(i for i, (a, b) in enumerate(zip(x.ids, y.ids)) if a != b) for x, y in zip(many, many[1:]))
    assert len(evaluated) == len(many)  # one call per case
    assert shared > 10 and sum(evaluated) <= sum(c.span[-1] + 1 for c in many) - (len(many) - 1) * shared


def test_a_drift_pass_stops_at_the_first_look_that_settles_it(trained_run, tokenizer):
    """measure_file asks `settled` at each of LOOKS (64, 128, 256 positions) and stops where it says
    so; the KL it has by then is the full pass's, conversation for conversation."""
    import numpy as np

    from fasttune import measure

    run_dir, _ = trained_run
    chats = [[{"role": "user", "content": f"What is {i} plus {i}?"},
              {"role": "assistant", "content": f"{i} plus {i} is {2 * i}: add {i} to itself and you get {2 * i}."}]
             for i in range(60)]
    cases = measure.cases(tokenizer, chats)
    spans = np.cumsum([len(c.span) for c in cases])
    assert spans[-1] > 300  # past every look
    gguf = run_dir / "gguf"
    ref = measure.measure_file(gguf / "memorize-bf16.gguf", "bf16", None, cases, None, None).logprobs
    full = measure.measure_file(gguf / "memorize-q4_k_m.gguf", "q4_k_m", None, cases, ref, None,
                                settled=lambda kl: False)
    assert full.row["drift_positions"] == spans[-1] and len(full.case_kl) == len(cases)
    asked = []
    early = measure.measure_file(gguf / "memorize-q4_k_m.gguf", "q4_k_m", None, cases, ref, None,
                                 settled=lambda kl: asked.append(len(kl)) or len(asked) == 2)
    first, second = (int(np.searchsorted(spans, look)) + 1 for look in measure.LOOKS[:2])
    assert asked == [first, second]  # once per look, at the first conversation that reaches it
    assert early.row["drift_positions"] == spans[second - 1] < spans[-1] and len(early.case_kl) == second
    np.testing.assert_allclose(early.case_kl, full.case_kl[:second], rtol=1e-5)
