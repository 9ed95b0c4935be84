"""Configuration: dataclasses with help on every field.

Precedence: dataclass defaults < the recipe's own defaults < a YAML file (`--config`) < the command
line. Unknown keys in the YAML file, values of the wrong type and unknown flags are errors. Parsing
is transformers' `HfArgumentParser` (every field is a flag under both spellings, `--eval_data` and
`--eval-data`); the YAML file is read and checked here rather than by TRL's `TrlParser`, which
would copy an `env:` mapping into the environment and pass unchecked types through.
"""

from __future__ import annotations

import dataclasses
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fasttune import UserError

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Layers a family fuses (Phi-3: q/k/v in one Linear, gate/up in another) -> the projections they hold
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def lora_targets(wanted: list[str], linears: set[str]) -> list[str]:
    """The layer names to put LoRA on in a model whose linear layers (but its head) are named `linears`:
    `wanted`, with the parts of a fused layer standing for it (the default's seven projections are Phi-3's
    four layers). A name given that is no such layer is an error, where PEFT would leave it out silently;
    the default's names apply where the model has them (a family outside the seven, trained without a GGUF)."""
    targets = list(wanted)
    for fused, parts in FUSED_PROJECTIONS.items():
        named = [p for p in parts if p in targets]
        if fused not in linears or not named:
            continue
        if len(named) < len(parts):
            raise UserError(f"--lora_target_modules: this model computes {', '.join(parts)} in one layer, {fused}; "
                            f"name all of them or {fused}")
        targets = [fused if t == named[0] else t for t in targets if t not in named[1:]]
    unknown = [t for t in targets if t not in linears]
    if wanted == LORA_TARGETS and len(unknown) < len(targets):
        return [t for t in targets if t in linears]
    if unknown:
        raise UserError(f"--lora_target_modules: this model has no layer named {unknown[0]} that LoRA can adapt; "
                        f"its linear layers: {', '.join(sorted(linears))}")
    return targets


@dataclass
class ModelConfig:
    model: str = field(
        default=None,
        metadata={"help": "Base model (required): a hub name (Qwen/Qwen2.5-0.5B-Instruct), a local directory, or "
                          "'tiny' for a dry run on the embedded tiny Qwen2.5-architecture model (2 layers, random "
                          "weights: its answers mean nothing); 'tiny-qwen3', 'tiny-llama3.2' and 'tiny-phi3.5' for its "
                          "Qwen3, Llama 3.2 and Phi-3.5-mini twins."},
    )
    load_in_4bit: bool = field(
        default=True,
        metadata={"help": "QLoRA: load the base in 4-bit nf4 for training (merge still uses the 16-bit weights). "
                          "--no-4bit trains LoRA on the 16-bit base."},
    )
    max_seq_length: int = field(
        default=1024, metadata={"help": "Longest training sequence in tokens (prompt + answer)."}
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int | None = field(
        default=None,
        metadata={"help": "LoRA alpha; the update is scaled by alpha / r. Default: r (a scale of 1). The QLoRA "
                          "guide's 16 at r 64 (a scale of 0.25) learned far less in the same steps "
                          "(bench/lora_defaults.py)."},
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the LoRA input. 0 is Unsloth's plain fused LoRA path; above 0 its kernels "
                          "draw and keep a mask per adapted input (the QLoRA guide's value: 0.1)."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(LORA_TARGETS),
        metadata={"help": "Linear layers that get LoRA adapters (default: all seven projections; in a model that fuses "
                          "some, as Phi-3 does q/k/v in qkv_proj and gate/up in gate_up_proj, the fused layer)."},
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in the backward pass (Unsloth's offloaded variant): "
                                        "less memory, about 20-30%% slower."},
    )

    def __post_init__(self):
        # alpha follows r unless given; resolved here (every construction: flags, YAML, a run's config.yaml)
        # so that what a run's config.yaml records is the value it trained with
        if self.lora_alpha is None:
            self.lora_alpha = self.lora_r


@dataclass
class DataConfig:
    data: str = field(default=None, metadata={"help": "Training data (required): .jsonl, .json (array), .csv, "
                                                      ".parquet, a datasets.save_to_disk directory, or a hub "
                                                      "dataset name."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out data, same format; used for eval "
                                                                  "loss and the demo answer."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Without --eval_data: hold out this fraction of "
                                                                "the training records (shuffled with --seed)."})
    format: str = field(default="auto", metadata={"help": "auto (detect from the first record), messages, "
                                                          "sharegpt, alpaca, prompt_completion or fields."})
    split: str = field(default="train", metadata={"help": "Split to read from a saved or hub dataset."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message put before every example "
                                                                      "that has none."})
    user_template: str | None = field(
        default=None, metadata={"help": "format 'fields': Python format string that builds the user turn from a "
                                        "record's columns, e.g. 'Context: {context}'. Set by task recipes."},
    )
    assistant_template: str | None = field(
        default=None, metadata={"help": "format 'fields': format string that builds the assistant turn."}
    )
    on_bad_record: str = field(default="error", metadata={"help": "error: stop before training and list every "
                                                                  "bad record; skip: leave them out and write them "
                                                                  "with reasons to RUN_DIR/rejects.jsonl."})
    dedupe: bool = field(default=False, metadata={"help": "Remove duplicate records (they are always counted)."})
    truncation: str = field(default="drop", metadata={"help": "Examples whose answer does not fit in "
                                                              "max_seq_length: drop (leave out, counted and "
                                                              "written to rejects.jsonl) or keep (train on the "
                                                              "part that fits)."})
    train_on: str = field(default="all", metadata={"help": "Which assistant turns carry the loss: all, or only "
                                                           "the last one of each conversation."})
    special_tokens_in_text: str = field(default="control", metadata={
        "help": "What a special token's spelling written inside a message (<|im_end|>, <|im_start|>, ...) "
                "becomes: control (the tokenizer's default: the token itself, so the model learns to stop or "
                "switch roles there; counted and warned about) or literal (tokenized as the plain text it is)."})
    inspect: bool = field(default=False, metadata={"help": "Show the training mask and data statistics, write "
                                                           "OUT/inspect/ (HTML page, length histogram), and exit "
                                                           "without training."})
    inspect_examples: int = field(default=3, metadata={"help": "How many formatted examples --inspect shows."})


@dataclass
class TrainConfig:
    out: str = field(default=None, metadata={"help": "Run directory to write (required): adapter, merged model, "
                                                     "GGUF, logs."})
    epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=4, metadata={"help": "Examples per device step."})
    grad_accum: int = field(default=1, metadata={"help": "Steps to accumulate before an optimizer update."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler: str = field(default="constant", metadata={"help": "transformers scheduler name "
                                                                    "(constant, linear, cosine, ...)."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps spent warming up."})
    max_grad_norm: float = field(default=0.3, metadata={"help": "Gradient clipping norm."})
    weight_decay: float = field(default=0.001, metadata={"help": "AdamW weight decay."})
    optim: str = field(
        default="paged_adamw_32bit",
        metadata={"help": "Optimizer name as transformers spells it. Paged and 8-bit bitsandbytes optimizers "
                          "need CUDA; on CPU fasttune uses adamw_torch instead and says so."},
    )
    logging_steps: int = field(default=1, metadata={"help": "Log loss every N optimizer steps."})
    packing: bool = field(default=False, metadata={"help": "Pack several examples into one sequence without "
                                                           "padding; each still attends only to itself."})
    seed: int = field(default=42, metadata={"help": "Seed for LoRA init, shuffling, the eval split and dropout."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing run in --out."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N optimizer steps into "
                                                          "OUT/checkpoints (adapter, optimizer, scheduler, RNG, "
                                                          "step); the last two are kept. 0: no checkpoints."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in --out from its latest complete "
                                                          "checkpoint (after a crash or a kill); the other "
                                                          "settings must be the run's own."})
    plan: bool = field(default=False, metadata={"help": "Print the predicted peak GPU memory of this training run "
                                                        "(weights, LoRA + optimizer, activations, logits) and "
                                                        "whether it fits 8/12/16/24 GB, then exit: reads only the "
                                                        "model's config, no weights, no data."})
    gpu_gb: float | None = field(default=None, metadata={"help": "--plan: the GPU's memory in GB (default: show "
                                                                 "8, 12, 16 and 24)."})


@dataclass
class ExportConfig:
    quants: list[str] = field(
        default_factory=lambda: ["bf16", "auto"],
        metadata={"help": "GGUF files to write after training: bf16, f16, f32, q8_0 directly; q4_k_m, q5_k_m, "
                          "q6_k, ... via llama.cpp's quantizer; auto: write q8_0 down to q3_k_m (and iq4_xs, q2_k "
                          "with --imatrix), two q4_k_m mixes with the tensors the fine-tune moved most at q8_0, "
                          "and the base model in q4_k_m with the adapter applied at load time; measure each "
                          "against the 16-bit file and keep one by the rule in gguf/auto.md (--quant_tolerance). "
                          "--quants none skips export."},
    )
    quant_tolerance: float = field(
        default=1.0,
        metadata={"help": "auto: how many points (task score x 100) a quant may lose against the 16-bit file and "
                          "still be chosen. The task score decides only when half the eval set can show that "
                          "(about 1,750 examples at 1 point); otherwise KL from the 16-bit file does (gguf/auto.md)."},
    )
    imatrix: bool = field(
        default=True,
        metadata={"help": "Calibrate the quantized types on the run's training conversations: an importance matrix "
                          "(which input channels matter, gguf/imatrix.gguf) guides llama.cpp's rounding, and allows "
                          "the low-bit types (iq2_*, iq3_*, iq4_xs, q2_k)."},
    )
    lora_gguf: bool = field(
        default=False,
        metadata={"help": "Also write the LoRA adapter as a GGUF adapter (gguf/lora/<run>-lora.gguf) and the base "
                          "model as gguf/lora/base-<first type>.gguf: llama.cpp applies the adapter at load time "
                          "(--lora, lora_path=), so one base file serves many small adapters."},
    )
    verify: bool = field(
        default=True,
        metadata={"help": "After export, compare every GGUF with the merged model on a few of the run's own "
                          "conversations (logits, perplexity, greedy text, stopping): gguf/report.json."},
    )


@dataclass
class EvalConfig:
    metric: str = field(
        default="exact",
        metadata={"help": "How an answer is judged against the reference (set by the task recipe): exact "
                          "(normalized text), numeric (number within --tolerance, unit checked), choice (option "
                          "letter), json (valid JSON, per-field match), rouge (ROUGE-L F1), cot (the final "
                          "'Answer:' line of a worked solution, compared as exact or numeric)."},
    )
    tolerance: float = field(default=0.02, metadata={"help": "metric numeric/cot: relative tolerance on numbers."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer generated during evaluation "
                                                                "(greedy, the same for every model variant)."})
    evaluate: bool = field(default=True, metadata={"help": "At the end of a recipe, answer the eval data with the "
                                                           "base model, the fine-tuned one and each GGUF, and "
                                                           "write RUN_DIR/eval/ (report.md, report.json, chart)."})


PARTS = (ModelConfig, DataConfig, TrainConfig, ExportConfig, EvalConfig)


@dataclass
class Config:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    export: ExportConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str = "sft"  # the script that made the run (GGUF general.finetune); not a flag

    def flat(self) -> dict:
        """One flat mapping, the shape `--config` reads back (it ignores `recipe`)."""
        out = {}
        for part in (self.model, self.data, self.train, self.export, self.eval):
            out.update(dataclasses.asdict(part))
        out["recipe"] = self.recipe
        return out

    def save(self, path: Path) -> None:
        from fasttune.rundir import write_text

        write_text(path, yaml.safe_dump(self.flat(), sort_keys=False, allow_unicode=True))


# Short spellings users expect that HfArgumentParser cannot express (its boolean complement is
# always --no_<field>); rewritten before parsing.
FLAG_ALIASES = {"--no-4bit": ["--load_in_4bit", "false"], "--4bit": ["--load_in_4bit", "true"]}


def parse(argv: list[str] | None = None, defaults: dict | None = None, prog: str | None = None) -> Config:
    """Parse a recipe's command line into a Config. `defaults` are the recipe's own."""
    import sys

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [part for arg in argv for part in FLAG_ALIASES.get(arg, [arg])]
    parser = HfArgumentParser(PARTS, prog=prog, epilog="--config FILE.yaml: any of the fields above as a flat YAML "
                                                       "mapping; flags given on the command line win.")
    fields = {a.dest for a in parser._actions}
    if defaults:
        unknown = set(defaults) - fields
        if unknown:
            raise ValueError(f"recipe defaults name unknown fields: {sorted(unknown)}")
        parser.set_defaults(**defaults)
    config_path, argv = _pop_flag(argv, "--config")
    if config_path:
        parser.set_defaults(**read_config(config_path))
    *parts, cli_extra = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if cli_extra:
        raise UserError(f"unknown arguments: {' '.join(cli_extra)} (--help lists every flag)")
    model, data, train, export, eval_ = parts
    if model.model is None:
        raise UserError("--model required: a hub name (Qwen/Qwen2.5-0.5B-Instruct), a model directory, or "
                        "--model tiny for a dry run on a tiny random-weight model")
    missing = [flag for flag, value in (("--data", data.data), ("--out", train.out)) if value is None]
    if missing and not train.plan:
        raise UserError(f"{' and '.join(missing)} required (--help lists every flag)")
    if not 0 <= data.eval_fraction < 1:
        raise UserError(f"--eval_fraction {data.eval_fraction}: must be 0 <= f < 1")
    if not 0 <= train.warmup_ratio < 1:
        raise UserError(f"--warmup_ratio {train.warmup_ratio}: must be a fraction of the steps, 0 <= r < 1")
    if not 0 <= model.lora_dropout < 1:
        raise UserError(f"--lora_dropout {model.lora_dropout}: must be 0 <= p < 1")
    for flag, value in (("--epochs", train.epochs), ("--batch_size", train.batch_size),
                        ("--grad_accum", train.grad_accum), ("--logging_steps", train.logging_steps),
                        ("--max_seq_length", model.max_seq_length), ("--lora_r", model.lora_r),
                        ("--lora_alpha", model.lora_alpha),
                        ("--max_new_tokens", eval_.max_new_tokens)):
        if value <= 0:
            raise UserError(f"{flag} {value}: must be above 0")
    for flag, template in (("--user_template", data.user_template), ("--assistant_template", data.assistant_template)):
        _check_template(flag, template)
    if data.system_prompt and '"""' in data.system_prompt:
        raise UserError('--system_prompt contains """, which would end the SYSTEM block of the Ollama Modelfile '
                        "written beside every GGUF; write it without three double quotes in a row")
    if export.quants == ["none"]:
        export.quants = []
    recipe = Path(prog).stem if prog else "sft"
    return Config(model, data, train, export, eval_, recipe)


def _pop_flag(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """(value, the other arguments) for `--flag VALUE` or `--flag=VALUE`; the last one wins."""
    value, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] == flag:
            if i + 1 >= len(argv):
                raise UserError(f"{flag} needs a file name")
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith(flag + "="):
            value, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return value, rest


def _check_template(flag: str, template: str | None) -> None:
    """A format string Python can read: a stray brace fails here, not on the first record."""
    import string

    if template is None:
        return
    try:
        list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(f"{flag} {template!r}: {e}; write {{{{ and }}}} for a literal brace") from None


# What a YAML value must be for each type the config fields use: (check, what to say when it fails).
YAML_TYPES = {
    str: (lambda v: isinstance(v, str), "a string"),
    str | None: (lambda v: v is None or isinstance(v, str), "a string"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    int | None: (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)), "a whole number or null"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    float | None: (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    list[str]: (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings, e.g. [a, b]"),
}


def _float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _yaml_kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def read_config(path: str | Path) -> dict:
    """A --config YAML file, checked key by key before anything uses it: unknown keys (TRL's `env`,
    which would set environment variables, included) and values of the wrong type are errors naming
    the file and line. Returns the values as parse() defaults (a run's own `recipe` key is dropped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)  # nodes with line numbers
        values = yaml.safe_load(text)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict) or root is None:
        raise UserError(f"{path}: a config file is a flat mapping of fields (epochs: 3), got {_yaml_kind(values)}")
    lines = {node.value: node.start_mark.line + 1 for node, _ in root.value if isinstance(node, yaml.ScalarNode)}
    types = {name: hint for part in PARTS for name, hint in typing.get_type_hints(part).items()}
    out = {}
    for key, value in values.items():
        where = f"{path}:{lines.get(str(key), '?')}"
        if key == "recipe":  # written into a run's config.yaml; not a flag
            continue
        if key not in types:
            hint = " (environment variables are not set from a config file)" if key == "env" else ""
            raise UserError(f"{where}: unknown key '{key}'{hint}; --help lists every field")
        check, expected = YAML_TYPES[types[key]]
        if isinstance(value, str) and types[key] in (float, float | None):
            value = _float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if not check(value):
            raise UserError(f"{where}: key '{key}': expected {expected}, got {_yaml_kind(value)} ({value!r:.60})")
        out[key] = value
    return out


def read_task(path: str | Path) -> dict:
    """A recipe's task (recipes/<name>.yaml: system prompt, templates, metric...) as parse() defaults:
    plain data, so tests and benchmarks read a task without running its script. Checked as --config is."""
    return read_config(path)


# Flags that say how to start, not what to train: they may differ when a run is resumed.
HOW_TO_START = ("resume", "overwrite", "plan", "gpu_gb")


def create_run_dir(cfg: Config) -> Path:
    """Make (or, with --overwrite, empty) the run directory, lock it for this process, and write the
    resolved config.yaml into it (--resume: check it instead). Refuses a folder that holds something
    other than a fasttune run, before touching anything in it."""
    from fasttune import rundir

    run_dir = Path(cfg.train.out)
    is_run = rundir.is_run(run_dir)
    if cfg.train.resume:
        if not is_run:
            raise UserError(f"--resume: {run_dir} holds no run (no config.yaml); start it without --resume")
        rundir.lock(run_dir)
        saved = {k: v for k, v in load_run(run_dir).flat().items() if k not in HOW_TO_START}
        differ = [k for k, v in cfg.flat().items() if k not in HOW_TO_START and saved.get(k) != v]
        if differ:
            raise UserError(f"--resume: these settings differ from the run's config.yaml: {', '.join(differ)}; "
                            f"resume with the same ones (--config {run_dir / 'config.yaml'} --resume)")
        return run_dir
    if is_run and not cfg.train.overwrite:
        raise UserError(f"--out {run_dir}: a run already lives there; pass --resume to continue it, --overwrite "
                        "to replace it, or choose another --out")
    if run_dir.is_dir() and not is_run:
        other = sorted(p.name for p in run_dir.iterdir() if p.name not in (rundir.INSPECT, rundir.LOCK))
        if other:
            raise UserError(f"--out {run_dir}: a folder that is not a fasttune run (it holds "
                            f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}); nothing was changed. "
                            "Choose a new or empty folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot create it ({e.strerror}); choose a folder you can write to") from None
    rundir.lock(run_dir)
    if is_run:  # --overwrite: all a run wrote goes, so no file of the old run can pass for the new one's
        for name in rundir.RUN_CONTENTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    cfg.save(run_dir / "config.yaml")
    return run_dir


def load_run(run_dir: str | Path) -> Config:
    """The Config a recipe run recorded in RUN_DIR/config.yaml."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: no config.yaml; pass a run directory written by a recipe")
    flat = yaml.safe_load(path.read_text())
    parts = []
    for cls in PARTS:
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append(cls(**{k: v for k, v in flat.items() if k in names}))
    return Config(*parts, recipe=flat.get("recipe", "sft"))
