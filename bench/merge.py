#!/usr/bin/env python
"""Merge + bf16 export in bounded memory: fasttune's streamed merge against PEFT's merge_and_unload,
on Qwen2.5-shaped checkpoints of growing size, in one run.

    python bench/merge.py [--shapes 0.5b 1.5b 3b] [--stream_only 7b] [--work DIR]

For each shape: a random-weight bf16 checkpoint with Qwen2.5's real widths (written tensor by
tensor in 2 GB shards, as the hub ships them) and a random LoRA adapter (r 16, the seven
projections, B non-zero so every delta is real). Then, each in a fresh process (its peak resident
memory, VmHWM, is its own):
  peft     today's usual merge: the base loaded in float32, PeftModel.merge_and_unload, cast to
           bf16, save_pretrained (what fasttune did before the streamed merge)
  stream   fasttune.merge.merge
  export   fasttune.convert.convert of the streamed merge to a bf16 GGUF
  imports  a process that imports what `stream` imports and stops: the floor under every row
Reported: seconds and peak RSS per step (GiB), the --plan prediction beside the streamed steps, and
the ratios stream / peft. Shapes in --stream_only skip
the peft row (a 7B in float32 needs about 30 GB). Appends to bench/RESULTS.md. Needs free disk of
about 3 x the bf16 size of the largest shape.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results  # bench/results.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5's published widths (config.json of each size); vocabulary, rope and norms as tiny.TINY_CONFIG.
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HUB_SHARD = 2 << 30

STEPS = {
    "peft": """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
model = PeftModel.from_pretrained(model, ADAPTER).merge_and_unload().to(torch.bfloat16)
model.save_pretrained(OUT)
AutoTokenizer.from_pretrained(ADAPTER).save_pretrained(OUT)
""",
    "stream": """
from pathlib import Path
from fasttune import merge
merge.merge(Path(ADAPTER), Path(OUT), base=BASE)
""",
    "export": """
from pathlib import Path
from fasttune import convert
convert.convert(Path(OUT), Path(OUT + ".gguf"), "bf16")
""",
    "imports": """
from fasttune import merge, convert
""",
}


def build(dest: Path, shape: dict) -> tuple[Path, Path, int]:
    """(base dir, adapter dir, parameters): random bf16 weights written shard by shard, never the whole model."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from fasttune.tiny import TINY_CONFIG, tiny_model_dir

    base, adapter = dest / "base", dest / "adapter"
    config = AutoConfig.for_model("qwen2", **dict(TINY_CONFIG, initializer_range=0.02, **shape))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    names = {n: tuple(p.shape) for n, p in meta.state_dict().items()}
    if config.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    params = sum(math.prod(s) for s in names.values())
    if not (base / "done").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        base.mkdir(parents=True)
        torch.manual_seed(0)
        shards, current, size = [], {}, 0
        for name, s in names.items():
            if current and size + 2 * math.prod(s) > HUB_SHARD:
                shards.append(current)
                current, size = {}, 0
            current[name] = s
            size += 2 * math.prod(s)
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: (torch.randn(s) * 0.02).to(torch.bfloat16) for n, s in shard.items()}
            save_file(tensors, base / file, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, file)
            del tensors
        (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        config.dtype, config.architectures = torch.bfloat16, ["Qwen2ForCausalLM"]
        config.save_pretrained(base)
        AutoTokenizer.from_pretrained(tiny_model_dir()).save_pretrained(base)
        adapter.mkdir()
        lora = {}
        for name, s in names.items():
            if name.endswith(".weight") and name.split(".")[-2] in TARGETS:
                module = f"base_model.model.{name.removesuffix('.weight')}"
                lora[f"{module}.lora_A.weight"] = torch.randn(16, s[1]) * 0.01
                lora[f"{module}.lora_B.weight"] = torch.randn(s[0], 16) * 0.01
        save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": 16,
            "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "target_modules": TARGETS,
            "use_rslora": False, "use_dora": False, "fan_in_fan_out": False}))
        AutoTokenizer.from_pretrained(base).save_pretrained(adapter)
        (base / "done").write_text("")
    return base, adapter, params


def run_step(step: str, base: Path, adapter: Path, out: Path) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one step in a fresh process. The peak is VmHWM, the high-water mark of
    the process's own address space: ru_maxrss would carry over this process's RSS from the fork."""
    code = (f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nBASE, ADAPTER, OUT = "
            f"{str(base)!r}, {str(adapter)!r}, {str(out)!r}\nt = time.perf_counter()\n{STEPS[step]}\n"
            "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
            "print('RESULT', time.perf_counter() - t, int(hwm.split()[1]) * 1024)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{step} on {base} failed:\n{proc.stderr[-3000:]}")
    _, seconds, peak = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")).split()
    return float(seconds), int(peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=["0.5b", "1.5b", "3b"], choices=list(SHAPES))
    parser.add_argument("--stream_only", nargs="*", default=[], choices=list(SHAPES),
                        help="shapes measured without the peft row (too large for float32 in this machine's RAM)")
    parser.add_argument("--work", type=Path, help="keep the checkpoints here (default: a temporary folder)")
    a = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from fasttune import plan

    gb = 1 << 30
    lines = ["| shape | parameters | bf16 GB | peft s | peft peak GB | stream s | stream peak GB (planned) | export s | "
             "export peak GB (planned) | imports peak GB | stream / peft: time | stream / peft: peak |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        for name in a.shapes + a.stream_only:
            base, adapter, params = build(work / name, SHAPES[name])
            measured = {}
            for step in ("imports", "peft", "stream", "export"):
                if step == "peft" and name in a.stream_only:
                    continue
                out = work / name / f"merged-{step}" if step != "export" else work / name / "merged-stream"
                t = time.perf_counter()
                measured[step] = run_step(step, base, adapter, out)
                print(f"{name} {step}: {measured[step][0]:.1f} s, peak {measured[step][1] / gb:.2f} GB "
                      f"({time.perf_counter() - t:.0f} s with the process start)", flush=True)
                if step == "peft":
                    shutil.rmtree(out)
            shutil.rmtree(work / name / "merged-stream")
            (work / name / "merged-stream.gguf").unlink()
            peft = measured.get("peft")
            planned = dict(plan.after_training(plan.shapes(str(base), TARGETS), 16, "cpu"))
            cells = [name, f"{params / 1e9:.2f} B", f"{2 * params / gb:.2f}",
                     f"{peft[0]:.0f}" if peft else "-", f"{peft[1] / gb:.2f}" if peft else "-",
                     f"{measured['stream'][0]:.0f}",
                     f"{measured['stream'][1] / gb:.2f} ({planned['merge (streamed)'] / gb:.2f})",
                     f"{measured['export'][0]:.0f}",
                     f"{measured['export'][1] / gb:.2f} ({planned['GGUF export (streamed)'] / gb:.2f})",
                     f"{measured['imports'][1] / gb:.2f}",
                     f"{measured['stream'][0] / peft[0]:.2f}" if peft else "-",
                     f"{measured['stream'][1] / peft[1]:.2f}" if peft else "-"]
            lines.append("| " + " | ".join(cells) + " |")
            if a.work is None:
                shutil.rmtree(work / name)
    table = "\n".join(lines)
    print(table)
    results.append("bench/merge.py", "python bench/merge.py " + " ".join(sys.argv[1:]), table)


if __name__ == "__main__":
    main()
