"""See the training mask before training (`--inspect`): the terminal view, an HTML page, a length
histogram and the statistics, built from exactly the token ids and labels training will use.
"""

from __future__ import annotations

import html
from pathlib import Path

from rich.console import Console
from rich.text import Text

from fasttune import rundir
from fasttune.chat import IGNORE
from fasttune.dataset import TrainingData

TRAINED_STYLE = "bold black on green"


def spans(tokenizer, input_ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Consecutive (text, trained?) runs of one example."""
    out: list[tuple[list[int], bool]] = []
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE
        if out and out[-1][1] == trained:
            out[-1][0].append(tok)
        else:
            out.append(([tok], trained))
    return [(tokenizer.decode(ids), trained) for ids, trained in out]


def terminal(console: Console, tokenizer, td: TrainingData, n: int) -> None:
    prepared = td.train.prepared
    for row, ex in list(zip(prepared.rows, prepared.kept))[:n]:
        console.rule(f"{ex.source}  ({len(row['input_ids'])} tokens)")
        text = Text()
        for piece, trained in spans(tokenizer, row["input_ids"], row["labels"]):
            text.append(piece, style=TRAINED_STYLE if trained else "dim")
        console.print(text)
    console.rule()
    console.print(Text("highlighted", style=TRAINED_STYLE), "= tokens with loss (assistant answers and their "
                  "<|im_end|>); dim = context only")
    console.print(td.summary())


def html_page(tokenizer, td: TrainingData, n: int) -> str:
    prepared = td.train.prepared
    blocks = []
    for row, ex in list(zip(prepared.rows, prepared.kept))[:n]:
        body = "".join(
            f'<span class="{"t" if trained else "c"}">{html.escape(piece)}</span>'
            for piece, trained in spans(tokenizer, row["input_ids"], row["labels"]))
        blocks.append(f"<h3>{html.escape(ex.source)} &middot; {len(row['input_ids'])} tokens</h3><pre>{body}</pre>")
    rejects = "".join(f"<li><code>{html.escape(r.source)}</code>: {html.escape(r.reason)}</li>"
                      for r in td.rejects[:200])
    return f"""<!doctype html><meta charset="utf-8"><title>fasttune: training mask</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} pre{{white-space:pre-wrap;
background:#fafafa;border:1px solid #ddd;padding:1em}} .t{{background:#b7f5b0;font-weight:bold}}
.c{{color:#777}}</style>
<h1>Training mask</h1>
<p><span class="t">Highlighted</span> tokens carry the loss (assistant answers and their &lt;|im_end|&gt;);
grey tokens are context only.</p>
<h2>Statistics</h2><pre>{html.escape(td.summary())}</pre>
<img src="lengths.png" alt="length histogram">
{''.join(blocks)}
<h2>Left out ({len(td.rejects)})</h2><ul>{rejects}</ul>
"""


def length_histogram(td: TrainingData, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prepared = td.train.prepared
    lengths = prepared.kept_lengths
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(lengths) // 4)), color="#4a8")
    ax.axvline(prepared.stats["max_length"], color="red", linestyle="--", label="max_seq_length")
    ax.set_xlabel("tokens per example (after truncation)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    with rundir.replacing(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def inspect(td: TrainingData, tokenizer, out_dir: Path, n: int = 3, console: Console | None = None) -> Path:
    """Print the mask and statistics; write out_dir/{mask.html, lengths.png, data_stats.json, rejects.jsonl}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    terminal(console or Console(), tokenizer, td, n)
    length_histogram(td, out_dir / "lengths.png")
    rundir.write_text(out_dir / "mask.html", html_page(tokenizer, td, n))
    td.save_stats(out_dir)
    return out_dir / "mask.html"
