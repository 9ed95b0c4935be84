#!/usr/bin/env python
"""Memory of the data stage: --inspect streams the file, training holds it; same run, same data.

    python bench/inspect_memory.py [--records 2000] [--times 4] [--chunk 500]

Writes two synthetic JSONL files (messages format), N and N x times records, and runs the data stage
(read, validate, tokenize with the mask, count) on each, twice: as --inspect does (hold=3: only the
examples it shows stay in memory) and as training does (hold=None: every tokenized example). Peak
heap above the start is measured with bench/peak_memory.py. Prints MB and, per mode, the ratio of
the larger file's peak to the smaller's: near 1 for a stream, near `times` for holding everything.
--chunk lowers the examples tokenized at once (default 8,000, fasttune.dataset.CHUNK_EXAMPLES) so
that both files span several chunks at a size this machine tokenizes in minutes; a chunk's own
memory is a constant of the stream. Appends to bench/RESULTS.md.
"""

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import results  # bench/results.py: this script's folder is on sys.path
from data import synthetic  # bench/data.py: the same synthetic conversations
from peak_memory import PeakMemory

from fasttune import config, dataset
from fasttune.chat_formats import ensure_chat_template
from fasttune.tiny import tiny_model_dir

MB = 1 << 20


def peak(path: Path, tokenizer, hold: int | None) -> int:
    cfg = config.parse(["--model", "tiny", "--data", str(path), "--out", str(path.parent / "out")])
    gc.collect()
    with PeakMemory() as memory:
        td = dataset.build(cfg, tokenizer, hold=hold)
        assert td.train.prepared.stats["kept"] > 0
        del td
    return memory.peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--times", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=500)
    args = parser.parse_args()
    dataset.CHUNK_EXAMPLES = args.chunk

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    ensure_chat_template(tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for n in (args.records, args.records * args.times):
            path = Path(tmp) / f"{n}.jsonl"
            with open(path, "w") as f:
                for messages in synthetic(n):
                    f.write(json.dumps({"messages": messages}) + "\n")
            files.append((n, path))
        peak(files[0][1], tokenizer, 3)  # warm-up: the tokenizer's caches and the template compile once
        for mode, hold in (("--inspect (streamed, hold=3)", 3), ("training (held, hold=None)", None)):
            peaks = [peak(path, tokenizer, hold) for _, path in files]
            sizes = [path.stat().st_size for _, path in files]
            rows.append((mode, sizes, peaks))
            print(f"{mode}: " + ", ".join(f"{s / MB:.1f} MB file -> {p / MB:.1f} MB peak"
                                          for s, p in zip(sizes, peaks)), flush=True)
    table = ["| mode | file sizes (MB) | peak heap (MB) | peak ratio (larger / smaller file) |", "|---|---|---|---|"]
    for mode, sizes, peaks in rows:
        table.append(f"| {mode} | {sizes[0] / MB:.1f} / {sizes[1] / MB:.1f} | {peaks[0] / MB:.1f} / "
                     f"{peaks[1] / MB:.1f} | {peaks[1] / peaks[0]:.2f} |")
    print("\n".join(table))
    results.append("bench/inspect_memory.py", " ".join(["python", *sys.argv]), "\n".join(table))


if __name__ == "__main__":
    main()
