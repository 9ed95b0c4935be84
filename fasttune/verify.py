"""Proof of fidelity for exported GGUF files: how close each one is to the merged model it came from.

For a few conversations from the run's own data it compares, file by file, against the merged
Hugging Face model: tokenization, logits at every position of the reference answers (max/mean
absolute difference, top-1 agreement), perplexity of those answers, greedy continuations, and whether a chat
completion through llama-cpp-python stops by itself. The result goes to gguf/report.json and one
line per file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fasttune import infer
from fasttune.chat import IGNORE, tokenize_chat
from fasttune.gguf import lora_pair


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _answer_nll(logits: np.ndarray, targets: list[int]) -> float:
    """Summed negative log-likelihood of `targets`, logits[i] predicting targets[i]."""
    logp = _log_softmax(logits.astype(np.float64))
    return float(-logp[np.arange(len(targets)), targets].sum())


def reference(merged_dir: Path, conversations: list[list[dict]], max_new_tokens: int) -> dict:
    """What the merged HF model says, computed once for all files.

    Logits are kept for the answer span only (the positions that predict trained tokens): that is
    what the comparison is about, and a whole conversation's logits over Qwen's 151,936-token
    vocabulary would cost 0.6 MB per position.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    cases = []
    with torch.no_grad():
        for conv in conversations:
            prompt_text = tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
            full_ids, labels = tokenize_chat(tokenizer, conv)
            # position i predicts token i+1: keep the positions whose next token is trained
            span = [i for i in range(len(full_ids) - 1) if labels[i + 1] != IGNORE]
            logits = model(torch.tensor([full_ids])).logits[0].numpy()[span]
            # plain argmax, as llama.cpp's greedy: not the model's generation_config (Qwen2.5-Instruct's has
            # repetition_penalty 1.05, which applies even without sampling)
            plain = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
            greedy = model.generate(torch.tensor([prompt_ids]), generation_config=plain, output_logits=True,
                                    return_dict_in_generate=True)
            cases.append(dict(messages=conv[:-1], prompt_text=prompt_text, prompt_ids=prompt_ids, full_ids=full_ids,
                              span=span, targets=[full_ids[i + 1] for i in span], logits=logits,
                              greedy=greedy.sequences[0, len(prompt_ids):].tolist(),
                              greedy_logits=torch.cat(greedy.logits).numpy()))  # step x vocabulary
    return {"cases": cases, "eos": tokenizer.eos_token_id}


def check_file(path: Path, ref: dict, adapter: Path | None = None) -> dict:
    """One GGUF (or a base GGUF with a GGUF LoRA `adapter` applied) against the merged model."""
    cases = ref["cases"]
    n_ctx = max(len(c["full_ids"]) + len(c["greedy"]) for c in cases) + 64
    tokenization_same, max_abs = True, 0.0
    gaps = []
    mean_abs, agree = [], []  # per answer position
    nll_merged = nll_file = 0.0
    lora = {"lora_path": str(adapter)} if adapter else {}
    with infer.load(path, n_ctx=max(n_ctx, 512), logits_all=True, **lora) as llm:
        for c in cases:
            tokenization_same &= llm.tokenize(c["prompt_text"].encode(), add_bos=False, special=True) == c["prompt_ids"]
            llm.reset()
            llm.eval(c["full_ids"])
            got = np.array(llm.scores[: len(c["full_ids"])])[c["span"]]
            diff = np.abs(got - c["logits"])
            max_abs = max(max_abs, float(diff.max()))
            mean_abs += diff.mean(-1).tolist()
            agree += (got.argmax(-1) == c["logits"].argmax(-1)).tolist()
            nll_merged += _answer_nll(c["logits"], c["targets"])
            nll_file += _answer_nll(got, c["targets"])
            out = []
            for tok in llm.generate(c["prompt_ids"], temp=0.0, reset=True):
                out.append(tok)
                if tok == ref["eos"] or len(out) >= len(c["greedy"]):
                    break
            step = next((k for k, (a, b) in enumerate(zip(out, c["greedy"])) if a != b), None)
            if step is not None:  # how close the merged model's own choice was there
                scores = c["greedy_logits"][step]
                gaps.append(float(scores[c["greedy"][step]] - scores[out[step]]))
        reply = infer.chat(llm, cases[0]["messages"], max_tokens=256)
        bits_per_weight = infer.bits_per_weight(llm)
    ppl_merged, ppl_file = float(np.exp(nll_merged / len(agree))), float(np.exp(nll_file / len(agree)))
    return {
        "file": f"lora/{adapter.name} on {path.name}" if adapter else path.name,
        "size_mb": round((adapter or path).stat().st_size / 1e6, 1),
        "bits_per_weight": round(bits_per_weight, 2),  # of the model loaded (base + adapter for a LoRA)
        "tokenization_identical": tokenization_same,
        "answer_positions": len(agree),
        "logits_max_abs_diff": round(max_abs, 4),
        "logits_mean_abs_diff": round(float(np.mean(mean_abs)), 4),
        "top1_agreement": round(float(np.mean(agree)), 4),
        "perplexity_merged": round(ppl_merged, 4),
        "perplexity_gguf": round(ppl_file, 4),
        "perplexity_ratio": round(ppl_file / ppl_merged, 4),
        "greedy_identical": f"{len(cases) - len(gaps)}/{len(cases)}",
        # per continuation that differs: the merged model's logit gap between its token and the file's where
        # they first part (a small gap is a near-tie any rounding may flip; a wide one, a different model)
        "greedy_divergence_gaps": [round(gap, 4) for gap in gaps],
        "chat_finish_reason": reply["choices"][0]["finish_reason"],
    }


def answer_spans(tokenizer, conversations: list[list[dict]], max_positions: int = 512) -> list[tuple[list[int], list[int]]]:
    """(token ids, positions predicting the last answer) per conversation, up to max_positions in all:
    the positions a quantized file is judged on (each keeps a vocabulary-sized row of logits). Any
    chat template: the answer is what the full conversation adds to the prompt with its assistant cue."""
    cases, total = [], 0
    for conv in conversations:
        prompt = tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
        if ids[: len(prompt)] != prompt:
            continue  # a template that rewrites earlier turns once answered: no clean answer span
        span = list(range(len(prompt) - 1, len(ids) - 1))[: max_positions - total]
        if span:
            cases.append((ids, span))
            total += len(span)
        if total >= max_positions:
            break
    return cases


def _span_logprobs(llm, ids: list[int], span: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return _log_softmax(np.array(llm.scores[: len(ids)], dtype=np.float64)[span])


def divergence(reference: Path, candidates: list[Path], cases: list[tuple[list[int], list[int]]]) -> dict[Path, dict]:
    """KL(reference || candidate) and top-1 agreement over the answer positions of `cases`, for each
    candidate: how far quantization moved the next-token distribution where the task is answered.

    The reference's log-probabilities are computed once and kept (positions x vocabulary floats);
    candidates are loaded one at a time.
    """
    n_ctx = max(max(len(ids) for ids, _ in cases) + 16, 512)
    with infer.load(reference, n_ctx=n_ctx, logits_all=True) as llm:
        ref = [_span_logprobs(llm, ids, span).astype(np.float32) for ids, span in cases]
    out = {}
    for path in candidates:
        kl, agree = [], []
        with infer.load(path, n_ctx=n_ctx, logits_all=True) as llm:
            for (ids, span), p_log in zip(cases, ref):
                q_log = _span_logprobs(llm, ids, span)
                kl += (np.exp(p_log) * (p_log - q_log)).sum(-1).tolist()
                agree += (p_log.argmax(-1) == q_log.argmax(-1)).tolist()
        out[path] = {"kl": float(np.mean(kl)), "top1": float(np.mean(agree)), "positions": len(kl)}
    return out


def line(row: dict) -> str:
    return (f"{row['file']}: {row['size_mb']} MB ({row['bits_per_weight']} bits/weight), tokenization {'identical' if row['tokenization_identical'] else 'DIFFERS'}"
            f", logits max|d| {row['logits_max_abs_diff']:.3g} mean {row['logits_mean_abs_diff']:.3g}, top-1 "
            f"{100 * row['top1_agreement']:.1f}%, perplexity x{row['perplexity_ratio']:.3f}, greedy "
            f"{row['greedy_identical']} identical{divergence_note(row)}, chat {row['chat_finish_reason']}")


def divergence_note(row: dict) -> str:
    gaps = row["greedy_divergence_gaps"]
    return f" (the others part at a merged-model gap of {', '.join(f'{g:.3g}' for g in gaps)})" if gaps else ""


def verify(merged_dir: Path, files: list[Path], conversations: list[list[dict]], report_path: Path,
           max_new_tokens: int = 32, lora: tuple[Path, Path] | None = None) -> list[dict]:
    """Compare every file (and the (adapter, base) pair) with the merged model on `conversations`;
    write report_path (JSON)."""
    if not files and not lora:
        return []
    ref = reference(merged_dir, conversations, max_new_tokens)
    rows = [check_file(path, ref) for path in files]
    if lora:
        rows.append(check_file(lora[1], ref, adapter=lora[0]))
    # keep the rows of files checked earlier (export/gguf.py adds one type to a run)
    earlier = json.loads(report_path.read_text())["files"] if report_path.is_file() else []
    names = {row["file"] for row in rows}
    all_rows = [row for row in earlier if row["file"] not in names
                and (report_path.parent / row["file"].split(" on ")[0]).is_file()]
    report_path.write_text(json.dumps({"conversations": len(conversations), "files": all_rows + rows}, indent=2))
    return rows


def verify_run(run_dir: Path, files: list[Path], n: int = 4) -> list[dict]:
    """verify() on a run directory, with up to n conversations from its eval data (else training data)."""
    from fasttune import config, data

    cfg = config.load_run(run_dir)
    if not cfg.export.verify or not files:
        return []
    d = cfg.data
    templates = data.Templates(d.user_template, d.assistant_template, d.system_prompt)
    loaded = data.load(d.eval_data or d.data, templates, d.format, on_bad_record="skip", split=d.split)
    conversations = [ex.messages for ex in loaded.examples[:n]]
    gguf_dir = Path(run_dir) / "gguf"
    return verify(Path(run_dir) / "merged", files, conversations, gguf_dir / "report.json", lora=lora_pair(gguf_dir))
