#!/usr/bin/env python
"""GGUF export speed and memory: fasttune's writer vs llama.cpp's convert_hf_to_gguf.py, same run.

    python bench/export.py

Builds a Qwen2.5-0.5B-shaped checkpoint (random bf16 weights, real tokenizer; cached), then writes
a bf16 GGUF with each converter in its own process and measures wall time and peak RSS, then
quantizes ours to q4_k_m with llama-cpp-python's bundled llama.cpp. Prints the table and appends it
to bench/RESULTS.md. The reference converter comes from the llama-cpp-python sdist (test and bench
use only).
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results  # bench/results.py: this script's folder is on sys.path


def run_measured(cmd, env=None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process (os.wait4 reports that child alone)."""
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child cannot block on it
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, *cmd], env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"{cmd} failed:\n{log.read().decode(errors='replace')[-2000:]}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports kB


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fasttune.tiny import (
        QWEN2_5_0_5B_CONFIG,
        build_model,
        cache_dir,
        llama_cpp_file,
    )

    model_dir = build_model(cache_dir() / "qwen2.5-0.5b-shaped", QWEN2_5_0_5B_CONFIG)
    root = llama_cpp_file("convert_hf_to_gguf.py").parent
    llama_cpp_file("conversion"), llama_cpp_file("gguf-py")
    out = Path(tempfile.mkdtemp(prefix="fasttune-bench-export-"))
    ours_script = out / "ours.py"
    ours_script.write_text("import sys\nfrom fasttune import convert\n"
                           "convert.convert(sys.argv[1], sys.argv[2], 'bf16')\n")

    ours_t, ours_rss = run_measured([str(ours_script), str(model_dir), str(out / "ours.gguf")])
    ref_env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
    ref_t, ref_rss = run_measured([str(root / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "bf16",
                                   "--outfile", str(out / "ref.gguf")], env=ref_env)
    same_size = (out / "ours.gguf").stat().st_size, (out / "ref.gguf").stat().st_size

    from fasttune import quantize

    t0 = time.perf_counter()
    quantize.quantize(out / "ours.gguf", out / "ours-q4_k_m.gguf", "q4_k_m")
    q_t = time.perf_counter() - t0
    size = lambda p: (out / p).stat().st_size / 1e6  # noqa: E731

    weights_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    table = "\n".join([
        f"| Qwen2.5-0.5B-shaped ({weights_mb:.0f} MB bf16 safetensors) | wall time | peak RSS | vs llama.cpp |",
        "|---|---|---|---|",
        f"| fasttune bf16 export | {ours_t:.1f} s | {ours_rss:.0f} MB | time {ours_t / ref_t:.2f}x, "
        f"memory {ours_rss / ref_rss:.2f}x |",
        f"| llama.cpp convert_hf_to_gguf.py bf16 | {ref_t:.1f} s | {ref_rss:.0f} MB | 1.00 |",
        f"| q4_k_m from our bf16 (llama_model_quantize) | {q_t:.1f} s | in-process | "
        f"{size('ours.gguf'):.0f} MB -> {size('ours-q4_k_m.gguf'):.0f} MB |",
    ])
    print(table)
    print(f"file sizes, ours vs reference: {same_size[0]} vs {same_size[1]} bytes")
    results.append("bench/export.py", "python bench/export.py", table)


if __name__ == "__main__":
    main()
