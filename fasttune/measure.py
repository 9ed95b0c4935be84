"""Measure every exported GGUF once: one load per file, one row with everything later stages show.

Each file is loaded by llama-cpp-python once and, in that load:
  fidelity  against the merged Hugging Face model, on the first few conversations: tokenization,
            logits at the answer positions (max/mean |difference|, top-1 agreement), perplexity of
            the answers, greedy continuations, and whether a chat answer stops by itself;
  drift     against the 16-bit file (measured first) on up to MAX_POSITIONS answer positions:
            mean KL(16-bit || file) and top-1 agreement, the low-variance signal of what rounding did;
  task      greedy answers to every eval prompt, scored with the recipe's metric; whether each
            answer stopped; generated tokens per second;
  size      bytes and real bits per weight.
gguf/report.json holds the rows; gguf/auto.md, eval/report.md and what a recipe prints are views of
them. Fidelity and drift are measured on the run's training conversations (export.measurer), the
task on its eval prompts.

Answer positions, one definition everywhere: the positions whose next token is the last assistant
message or the end-of-turn token that closes it (what training puts the loss on for that turn).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fasttune import cached_tokenizer, free_accelerator_memory, infer
from fasttune.chat_formats import stop_ids

logger = logging.getLogger(__name__)

MAX_POSITIONS = 512  # answer positions for KL/top-1: each keeps a vocabulary-sized row of the 16-bit file's
LOOKS = (64, 128, 256)  # answer positions after which a drift pass may stop early (measure_file's `settled`)
YARDSTICK = "q8_0"  # measured on every case, first after the 16-bit file: `settled` weighs the others against it
FIDELITY_CONVERSATIONS = 4  # compared with the merged HF model (float32 on a CPU, bf16 on a GPU)
GREEDY_TOKENS = 32  # greedy continuation compared token by token with the merged model's
CHAT_TOKENS = 256  # the fidelity chat answer: room to stop by itself


@dataclass
class Case:
    """One conversation as token ids, and the positions that predict its last answer."""

    messages: list[dict]  # the prompt: every message but the last answer
    prompt_text: str
    prompt_ids: list[int]
    ids: list[int]  # prompt + answer + end of turn (+ whatever the template adds after it)
    span: list[int]  # positions i whose next token ids[i + 1] is the answer or its end-of-turn token

    @property
    def targets(self) -> list[int]:
        return [self.ids[i + 1] for i in self.span]


def cases(tokenizer, conversations: list[list[dict]], max_positions: int = MAX_POSITIONS) -> list[Case]:
    """Cases for `conversations`, up to max_positions answer positions in all. A conversation whose
    template rewrites earlier turns once it is answered has no clean answer span and is left out."""
    stops = set(stop_ids(tokenizer))
    out, total = [], 0
    for conv in conversations:
        prompt_text = tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
        ids = tokenizer.encode(tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)
        if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
            continue
        end = next((i for i in range(len(prompt_ids), len(ids)) if ids[i] in stops), len(ids) - 1)
        span = list(range(len(prompt_ids) - 1, end))[: max_positions - total]
        if span:
            out.append(Case(conv[:-1], prompt_text, prompt_ids, ids, span))
            total += len(span)
        if total >= max_positions:
            break
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def distance(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """How far `logits` (positions x vocabulary) are from `ref_logits` at the same positions: the one
    definition used against the merged model and against the 16-bit file."""
    p_log, q_log = log_softmax(ref_logits), log_softmax(logits)
    diff = np.abs(logits.astype(np.float64) - ref_logits)
    return {"max_abs": diff.max(-1), "mean_abs": diff.mean(-1), "kl": (np.exp(p_log) * (p_log - q_log)).sum(-1),
            "agree": p_log.argmax(-1) == q_log.argmax(-1)}


# --- the merged model's side, computed once ----------------------------------------------------------

@dataclass
class Reference:
    """What the merged HF model says on the fidelity cases: answer-position logits and greedy output."""

    cases: list[Case]
    logits: list[np.ndarray]  # per case: span x vocabulary
    greedy: list[list[int]]
    greedy_logits: list[np.ndarray]  # per case: step x vocabulary
    stops: list[int]  # token ids that end an answer (chat_formats.stop_ids)


def merged_reference(merged_dir: Path, fidelity_cases: list[Case]) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    logger.info("the merged model's logits and greedy answers on %d conversations (the fidelity reference)",
                len(fidelity_cases))
    tokenizer = cached_tokenizer(merged_dir)
    # as the evaluation: float32 on the CPU, bf16 on a GPU (a 7B in float32 is 30 GB of host memory)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=dtype).to(device).eval()
    # plain argmax, as llama.cpp's greedy: not the model's generation_config (Qwen2.5-Instruct's has
    # repetition_penalty 1.05, which applies even without sampling)
    plain = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=stop_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    ref = Reference(fidelity_cases, [], [], [], stop_ids(tokenizer))
    with torch.no_grad():
        for c in tqdm(fidelity_cases, desc="the merged model's answers", unit="conversation", leave=False):
            ref.logits.append(model(torch.tensor([c.ids], device=device)).logits[0].float().cpu().numpy()[c.span])
            out = model.generate(torch.tensor([c.prompt_ids], device=device), generation_config=plain,
                                 output_logits=True, return_dict_in_generate=True)
            ref.greedy.append(out.sequences[0, len(c.prompt_ids):].tolist())
            ref.greedy_logits.append(torch.cat(out.logits).float().cpu().numpy())
    del model
    free_accelerator_memory()
    return ref


# --- one file ---------------------------------------------------------------------------------------

@dataclass
class Task:
    """The eval prompts and how their answers are judged."""

    prompts: list[list[dict]]
    references: list[str]
    metric: str
    tolerance: float
    max_new_tokens: int
    prompt_lengths: list[int] = field(default_factory=list)  # tokens, with the chat template and assistant cue


def make_task(merged_dir: Path, examples, metric: str, tolerance: float, max_new_tokens: int) -> Task:
    """The eval examples as prompts and references, each prompt's length in tokens counted."""
    tokenizer = cached_tokenizer(merged_dir)
    prompts = [ex.messages[:-1] for ex in examples]
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
               for p in prompts]
    return Task(prompts, [ex.messages[-1]["content"] for ex in examples], metric, tolerance, max_new_tokens, lengths)


@dataclass
class Measured:
    row: dict
    answers: list = field(default_factory=list)  # evaluate.Answer per eval prompt (None: not asked)
    answer_seconds: float = 0.0
    scores: list = field(default_factory=list)  # the metric's score per eval prompt, in [0, 1] (None: not asked)
    logprobs: list[np.ndarray] | None = None  # the drift cases' log-probabilities (kept for the 16-bit file)
    case_kl: list[float] | None = None  # KL from the 16-bit file summed over each drift case measured
    fidelity_pending: Reference | None = None  # measured against it at the file's next load (answer(fidelity=True))


def _logits(llm, ids: list[int], span: list[int]) -> np.ndarray:
    """The logits at `span` (consecutive positions), in one pass over what llm does not hold yet.

    Only the span asks for logits, so llama.cpp skips the output layer (a vocabulary-wide matmul per
    token: a quarter of Qwen2.5-0.5B) everywhere else, and prompt and span go in one call (small calls
    cost several times more per token on a CPU). The cache of the prefix `ids` shares with what llm
    holds (a system prompt, a fixed instruction) is kept. Written against llama-cpp-python 0.3.36's
    internals (pinned): its eval() asks for logits at every token or at the last one only.
    """
    first, last = span[0], span[-1]
    held = llm.input_ids[: llm.n_tokens]
    keep = next((i for i, (a, b) in enumerate(zip(held, ids[:first])) if a != b), min(len(held), first))
    llm._ctx.kv_cache_seq_rm(-1, keep, -1)
    llm.n_tokens, rows = keep, []
    for start in range(keep, last + 1, llm.n_batch):
        chunk = ids[start : min(last + 1, start + llm.n_batch)]
        llm._batch.set_batch(chunk, n_past=start, logits_all=False)  # logits at the chunk's last token only
        wanted = [j for j in range(len(chunk)) if start + j >= first]
        for j in wanted:
            llm._batch.batch.logits[j] = True
        llm._ctx.decode(llm._batch)
        rows += [np.ctypeslib.as_array(llm._ctx.get_logits_ith(j), shape=(llm.n_vocab(),)).copy() for j in wanted]
        llm.input_ids[start : start + len(chunk)] = chunk
        llm.n_tokens = start + len(chunk)
    llm._requires_eval = True  # the context's last logits are not a prompt's: generate() evaluates again
    return np.array(rows, dtype=np.float32)


def measure_file(path: Path, qtype: str, reference: Reference | None, drift_cases: list[Case],
                 drift_ref: list[np.ndarray] | None, task: Task | None, adapter: Path | None = None,
                 task_at=None, settled=None) -> Measured:
    """Load `path` (with a GGUF LoRA `adapter` applied, if given) once and measure it.

    drift_ref None: this is the 16-bit reference; its log-probabilities are returned for the others.
    task_at: which eval prompts to answer (None: all of them).
    settled: called with the KL summed per drift case so far at each of LOOKS; True stops the drift
    pass there (the verdict it feeds cannot change with more positions). None: every case.
    """
    task_at = list(range(len(task.prompts)) if task and task_at is None else task_at or [])
    lora = {"lora_path": str(adapter)} if adapter else {}
    adapter_bytes = adapter.stat().st_size if adapter else 0
    row = {"file": infer.model_name(path, adapter), "type": qtype,
           "size_mb": round((path.stat().st_size + adapter_bytes) / 1e6, 1)}
    if adapter:
        row["adapter_mb"] = round(adapter_bytes / 1e6, 1)
    out = Measured(row)
    with infer.load(path, n_ctx=_context(reference, drift_cases, task, task_at), **lora) as llm:
        row["bits_per_weight"] = round(infer.bits_per_weight(llm, extra_bytes=adapter_bytes), 2)
        if reference:
            row.update(_fidelity(llm, reference))
        if drift_ref is None:
            out.logprobs = [log_softmax(_logits(llm, c.ids, c.span)).astype(np.float32)
                            for c in tqdm(drift_cases, desc=f"answer positions of {path.name}", unit="case",
                                          leave=False)]
            row.update(kl=0.0, top1=100.0, drift_positions=sum(len(c.span) for c in drift_cases),
                       drift_conversations=len(drift_cases))
        elif drift_cases:
            d = _drift(llm, drift_cases, drift_ref, settled, path.name)
            out.case_kl = [float(x["kl"].sum()) for x in d]
            row.update(kl=float(f"{np.mean(np.concatenate([x['kl'] for x in d])):.4g}"),  # 4 significant digits
                       top1=round(100 * float(np.mean(np.concatenate([x["agree"] for x in d]))), 1),
                       drift_positions=sum(len(c.span) for c in drift_cases[: len(d)]), drift_conversations=len(d))
        if task_at:
            _answer(llm, out, task, task_at, row["file"])
    return out


def _context(reference: Reference | None, drift_cases: list[Case], task: Task | None, task_at) -> int:
    """The context a load needs for what it measures: the longest drift case, fidelity case with its
    greedy continuation, chat answer, eval prompt with its answer."""
    lengths = [256] + [len(c.ids) for c in drift_cases]
    if reference:
        lengths += [len(c.ids) + len(g) for c, g in zip(reference.cases, reference.greedy)]
        lengths.append(len(reference.cases[0].prompt_ids) + CHAT_TOKENS)
    lengths += [task.prompt_lengths[i] + task.max_new_tokens for i in task_at]
    return max(lengths) + 64


def _drift(llm, drift_cases: list[Case], drift_ref: list[np.ndarray], settled, name: str) -> list[dict]:
    """distance() from the 16-bit file per drift case, in order, until `settled` says so at a look."""
    out, positions, looks = [], 0, list(LOOKS) if settled else []
    bar = tqdm(total=sum(len(c.span) for c in drift_cases), desc=f"answer positions of {name}", unit="pos",
               leave=False)
    for c, ref in zip(drift_cases, drift_ref):
        out.append(distance(ref, log_softmax(_logits(llm, c.ids, c.span))))
        positions += len(c.span)
        bar.update(len(c.span))
        if looks and positions >= looks[0]:
            looks = [n for n in looks if n > positions]
            if settled([float(x["kl"].sum()) for x in out]):
                break
    bar.close()
    return out


def answer(path: Path, task: Task | None, indices, into: Measured, adapter: Path | None = None,
           fidelity: bool = False) -> None:
    """Answer the eval prompts at `indices` that `into` (path's measurement, with `adapter` applied)
    has no answer for yet, with one more load; its row gets the score over every prompt answered so far.
    fidelity: also measure the file against the merged model, if measure() left that pending."""
    todo = [i for i in indices if not into.answers or into.answers[i] is None]
    pending = into.fidelity_pending if fidelity else None
    if todo or pending:
        n_ctx = _context(pending, [], task, todo)
        with infer.load(path, n_ctx=n_ctx, **({"lora_path": str(adapter)} if adapter else {})) as llm:
            if pending:
                into.row.update(_fidelity(llm, pending))
                into.fidelity_pending = None
            if todo:
                _answer(llm, into, task, todo, into.row["file"])


def _answer(llm, out: Measured, task: Task, indices, name: str) -> None:
    """Greedy answers to the prompts at `indices`, scored; the row's score is over all answered."""
    from fasttune import evaluate

    indices = list(indices)
    start = time.perf_counter()
    got = evaluate.answer_llm(llm, [task.prompts[i] for i in indices], task.max_new_tokens,
                              desc=f"answering with {name}")
    out.answer_seconds += time.perf_counter() - start
    if not out.answers:
        out.answers, out.scores = [None] * len(task.prompts), [None] * len(task.prompts)
    for i, a in zip(indices, got):
        out.answers[i] = a
        out.scores[i] = evaluate.METRICS[task.metric](a.text, task.references[i], task.tolerance).score
    done = [(a, s) for a, s in zip(out.answers, out.scores) if a is not None]
    generated = sum(a.tokens for a, _ in done)
    out.row.update(score=round(100 * float(np.mean([s for _, s in done])), 2), score_examples=len(done),
                   stopped=round(float(np.mean([a.stopped for a, _ in done])), 4),
                   tokens_per_s=round(generated / out.answer_seconds, 1) if out.answer_seconds else None,
                   answer_seconds=round(out.answer_seconds, 2))


def _fidelity(llm, ref: Reference) -> dict:
    """The file against the merged model on the fidelity cases."""
    tokenization_same, gaps, parts = True, [], []
    nll_merged = nll_file = 0.0
    for c, logits, greedy, greedy_logits in zip(ref.cases, ref.logits, ref.greedy, ref.greedy_logits):
        tokenization_same &= llm.tokenize(c.prompt_text.encode(), add_bos=False, special=True) == c.prompt_ids
        got = _logits(llm, c.ids, c.span)
        parts.append(distance(logits, got))
        rows = np.arange(len(c.span))
        nll_merged -= float(log_softmax(logits)[rows, c.targets].sum())
        nll_file -= float(log_softmax(got)[rows, c.targets].sum())
        out = []
        for tok in llm.generate(c.prompt_ids, temp=0.0, reset=True):
            out.append(tok)
            if tok in ref.stops or len(out) >= len(greedy):
                break
        step = next((k for k, (a, b) in enumerate(zip(out, greedy)) if a != b), None)
        if step is not None:  # how close the merged model's own choice was there
            gaps.append(float(greedy_logits[step][greedy[step]] - greedy_logits[step][out[step]]))
    reply = infer.chat(llm, ref.cases[0].messages, max_tokens=CHAT_TOKENS)
    positions = sum(len(c.span) for c in ref.cases)
    ppl_merged, ppl_file = float(np.exp(nll_merged / positions)), float(np.exp(nll_file / positions))
    return {
        "tokenization_identical": tokenization_same,
        "answer_positions": positions,
        "logits_max_abs_diff": round(float(max(p["max_abs"].max() for p in parts)), 4),
        "logits_mean_abs_diff": round(float(np.mean(np.concatenate([p["mean_abs"] for p in parts]))), 4),
        "top1_agreement": round(float(np.mean(np.concatenate([p["agree"] for p in parts]))), 4),
        "perplexity_merged": round(ppl_merged, 4),
        "perplexity_gguf": round(ppl_file, 4),
        "perplexity_ratio": round(ppl_file / ppl_merged, 4),
        "greedy_identical": f"{len(ref.cases) - len(gaps)}/{len(ref.cases)}",
        # per continuation that differs: the merged model's logit gap between its token and the file's where
        # they first part (a small gap is a near-tie any rounding may flip; a wide one, a different model)
        "greedy_divergence_gaps": [round(gap, 4) for gap in gaps],
        "chat_finish_reason": reply["choices"][0]["finish_reason"],
    }


# --- a run's files ----------------------------------------------------------------------------------

class Measurer:
    """Measures GGUF files one at a time (one load each) against what is computed once: the drift
    cases, the merged model's fidelity reference, the 16-bit file's log-probabilities (the first file
    measured, when drift) and YARDSTICK's KL per case. export calls it file by file, so a file that
    need not be measured need not be written either."""

    def __init__(self, merged_dir: Path, conversations: list[list[dict]], task: Task | None, fidelity: bool = True,
                 drift: bool = True, settled=None):
        """conversations: where fidelity and drift are measured (the last message of each is the answer).
        settled(YARDSTICK's KL per case, a file's KL per case so far) -> True: that file's drift pass stops
        early (measure_file); a file measured before the yardstick runs every case.
        fidelity: whether files are compared with the merged model at all."""
        self.drift_cases = cases(cached_tokenizer(merged_dir), conversations)
        if not self.drift_cases:
            raise RuntimeError("no conversation has a clean answer span to measure on")
        self.reference = merged_reference(merged_dir, self.drift_cases[:FIDELITY_CONVERSATIONS]) if fidelity else None
        self.task, self.drift, self.settled = task, drift, settled
        self.drift_ref, self.yardstick = None, None

    def __call__(self, path: Path, qtype: str, adapter: Path | None = None, task_at=None,
                 fidelity_now: bool = True) -> Measured:
        """Measure `path` (with a GGUF LoRA `adapter`), answering the eval prompts at task_at (None: all).
        fidelity_now False: the comparison with the merged model is left pending for answer(fidelity=True)
        (auto's candidates: only the one kept needs it)."""
        yard, settled = self.yardstick, self.settled
        stop = (lambda kl: settled(yard[: len(kl)], kl)) if settled and yard else None
        m = measure_file(path, qtype, self.reference if fidelity_now else None, self.drift_cases if self.drift else [],
                         self.drift_ref if self.drift else [], self.task, adapter=adapter, settled=stop, task_at=task_at)
        m.fidelity_pending = None if fidelity_now else self.reference
        self.drift_ref = self.drift_ref or m.logprobs
        self.yardstick = self.yardstick or (m.case_kl if qtype == YARDSTICK else None)
        m.logprobs = None
        return m


def measure(merged_dir: Path, files: list[tuple[Path, str]], conversations: list[list[dict]], task: Task | None,
            fidelity: bool = True, pairs: list[tuple[Path, Path, str]] = (), drift: bool = True,
            task_at: dict[str, list[int]] | None = None) -> list[Measured]:
    """Measure `files` ((path, quant type); with drift, the first is the 16-bit reference the others'
    KL and top-1 are against), then each (base GGUF, GGUF LoRA adapter, type) pair the same way, every
    file on every case (Measurer's arguments; task_at: model name -> which eval prompts it answers,
    None: all answer all). The benches and tests measure whole sets this way; export, file by file."""
    measurer = Measurer(merged_dir, conversations, task, fidelity, drift)
    logger.info("measuring %d GGUF files, one load each: %d answer positions%s", len(files) + len(pairs),
                sum(len(c.span) for c in measurer.drift_cases),
                f", up to {len(task.prompts)} eval prompts" if task else "")
    models = [(path, qtype, None) for path, qtype in files] + [(base, qtype, adapter) for base, adapter, qtype in pairs]
    return [measurer(path, qtype, adapter, None if task_at is None else task_at.get(infer.model_name(path, adapter), []))
            for path, qtype, adapter in tqdm(models, desc="measuring GGUF files", unit="file")]


def line(row: dict) -> str:
    """One file's fidelity, as a recipe prints it."""
    text = f"{row['file']}: {row['size_mb']} MB ({row['bits_per_weight']} bits/weight)"
    if "tokenization_identical" in row:
        gaps = row["greedy_divergence_gaps"]
        text += (f", tokenization {'identical' if row['tokenization_identical'] else 'DIFFERS'}, logits max|d| "
                 f"{row['logits_max_abs_diff']:.3g} mean {row['logits_mean_abs_diff']:.3g}, top-1 "
                 f"{100 * row['top1_agreement']:.1f}%, perplexity x{row['perplexity_ratio']:.3f}, greedy "
                 f"{row['greedy_identical']} identical"
                 + (f" (the others part at a merged-model gap of {', '.join(f'{g:.3g}' for g in gaps)})" if gaps else "")
                 + f", chat {row['chat_finish_reason']}")
    return text
