"""Training on the tiny model: the loss falls, only the adapter moves, TRL masks as we do."""

import re

import pytest
import torch

from fasttune import chat, train
from fasttune import model as model_lib
from fasttune.chat import tokenize_chat
from fasttune.config import Config, DataConfig, ExportConfig, ModelConfig, TrainConfig
from fasttune.dataset import Split, TrainingData


def training_data(examples, tokenizer, max_length=256, **kwargs) -> TrainingData:
    return TrainingData(Split(None, chat.prepare(examples, tokenizer, max_length, **kwargs)), None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, memorized_chats):
    cfg = Config(
        ModelConfig(model="tiny", lora_r=16, max_seq_length=256),  # 4-bit QLoRA, the default path
        DataConfig(data="memorize.jsonl"),
        TrainConfig(out="unused", epochs=15, learning_rate=3e-3, batch_size=4, seed=0),
        ExportConfig(quants=[]),
    )
    model, tokenizer = model_lib.load_for_training(cfg.model, seed=0)
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    run_dir = tmp_path_factory.mktemp("train")
    trainer = train.train(model, tokenizer, training_data(memorized_chats, tokenizer), cfg, run_dir)
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return trainer, tokenizer, before, after, run_dir


def test_loss_falls(trained):
    trainer, *_ = trained
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 15
    # Four short answers, 15 steps at lr 3e-3: the tiny model memorises them. Stated margin: the
    # mean of the last three steps is below half the first step's loss.
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_only_adapter_weights_change(trained):
    _, _, before, after, _ = trained
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    quantized = [n for n in base if n.endswith("base_layer.weight")]
    assert len(quantized) == 14 and all(before[n].dtype == torch.uint8 for n in quantized)  # 4-bit nf4 base
    assert all(torch.equal(before[n], after[n]) for n in base)
    changed = [n for n in lora if not torch.equal(before[n], after[n])]
    assert len(changed) == len(lora), set(lora) - set(changed)


def test_trl_labels_equal_our_mask(trained, memorized_chats):
    trainer, tokenizer, *_ = trained
    row = trainer.train_dataset[0]
    ids, labels = tokenize_chat(tokenizer, memorized_chats[0].messages)
    assert row["input_ids"] == ids and row["labels"] == labels


def test_metrics_and_loss_curve(trained):
    _, _, _, _, run_dir = trained
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in lines) == 15
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_no_4bit_trains_lora_on_the_16bit_base(tmp_path, memorized_chats):
    cfg = Config(
        ModelConfig(model="tiny", load_in_4bit=False, lora_r=8, max_seq_length=256),
        DataConfig(data="memorize.jsonl"),
        TrainConfig(out="unused", epochs=4, learning_rate=3e-3, batch_size=4, seed=0),
        ExportConfig(quants=[]),
    )
    model, tokenizer = model_lib.load_for_training(cfg.model, seed=0)
    weights = [p for n, p in model.named_parameters() if n.endswith("q_proj.base_layer.weight")]
    assert weights and all(p.dtype == torch.bfloat16 for p in weights)
    trainer = train.train(model, tokenizer, training_data(memorized_chats, tokenizer), cfg, tmp_path)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]


def test_packed_batch_loss_equals_token_weighted_mean_of_single_losses(tokenizer, memorized_chats):
    """Packing is padding-free with per-example position ids: examples must not see each other."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    # TRL turns --packing into best-fit packing with this padding-free collator (on CPU, Unsloth's
    # backend switches packing off; the property below is what keeps packed examples apart anywhere).
    rows = chat.prepare(memorized_chats, tokenizer, 256).rows
    model = AutoModelForCausalLM.from_pretrained(model_lib.resolve("tiny"), dtype=torch.float32)
    model.config.use_cache = False  # as train.train sets it
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    with torch.no_grad():
        packed = model(**batch).loss.item()
        total, count = 0.0, 0
        for r in rows:
            loss = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item()
            n = sum(lab != -100 for lab in r["labels"][1:])  # labels shift by one inside the loss
            total, count = total + loss * n, count + n
    assert abs(packed - total / count) < 1e-4, (packed, total / count)


def test_out_of_memory_advice_names_what_to_lower_with_the_planners_numbers(qwen7b_config):
    from fasttune.config import parse
    from fasttune.train import out_of_memory_advice

    cfg = parse(["--data", "d.jsonl", "--out", "o", "--batch_size", "8", "--max_seq_length", "2048", "--no-4bit",
                 "--lora_r", "64", "--model", str(qwen7b_config)])
    advice = out_of_memory_advice(cfg, gpu_bytes=24 * 2**30)
    assert advice.startswith("the GPU (24.0 GB) ran out of memory training with batch 8 x 2048 tokens, LoRA r 64, "
                             "16-bit base (it needs "), advice
    for tip in ["--batch_size 4 --grad_accum 2", "--max_seq_length 1024", "--load_in_4bit true", "--lora_r 32",
                "--overwrite"]:
        assert tip in advice, tip
    # each tip carries what the run needs after it, by the planner, and each needs less than now
    needs = float(re.search(r"it needs ([\d.]+) GB", advice)[1])
    after = [float(x) for x in re.findall(r"-> needs ([\d.]+) GB", advice)]
    assert len(after) == 4 and all(x < needs for x in after), (needs, after)
    small = parse(["--data", "d.jsonl", "--out", "o", "--batch_size", "1", "--lora_r", "8", "--model", str(qwen7b_config)])
    assert "--batch_size" not in out_of_memory_advice(small, 8 * 2**30)
    assert "--lora_r" not in out_of_memory_advice(small, 8 * 2**30)


@pytest.mark.parametrize("key", ["loss", "eval_loss"])
def test_a_diverged_run_stops_at_the_step_with_the_value(tmp_path, key):
    from types import SimpleNamespace

    from fasttune import UserError
    from fasttune.train import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", learning_rate=0.5)
    state = SimpleNamespace(global_step=7, epoch=0.5)
    log.on_log(None, state, None, logs={"loss": 2.0, "grad_norm": float("inf")})  # fp16's skipped step: goes on
    with pytest.raises(UserError, match=rf"diverged at step 7: {key} is nan\. Nothing was exported.*"
                                        r"--learning_rate 0.5: try a tenth"):
        log.on_log(None, state, None, logs={"loss": 2.0, "grad_norm": 1.0, key: float("nan")})
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2  # the bad step is in the log too


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path):
    from types import SimpleNamespace

    from fasttune import UserError
    from fasttune.train import MetricsLog

    model = torch.nn.Linear(4, 4)
    model.bias.requires_grad_(False)
    log = MetricsLog(tmp_path / "metrics.jsonl", learning_rate=0.5)
    state, save = SimpleNamespace(global_step=5, epoch=0.5), SimpleNamespace(should_save=True)
    log.on_step_end(None, state, save, model=model)  # finite: saved
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    log.on_step_end(None, state, SimpleNamespace(should_save=False), model=model)  # no save due: not checked
    with pytest.raises(UserError, match=r"diverged by step 5: weight is not finite; no checkpoint was written"):
        log.on_step_end(None, state, save, model=model)
    with pytest.raises(UserError, match=r"weight is not finite; the adapter was not saved"):  # no save step at all
        log.on_train_end(None, state, None, model=model)
    with torch.no_grad():
        model.weight[0, 0] = 0.0
        model.bias[0] = float("nan")  # frozen: not the adapter's
    log.on_train_end(None, state, None, model=model)


def test_a_metrics_line_cut_by_a_kill_is_left_out(tmp_path):
    from fasttune.train import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    assert read_metrics(path)["loss"] == [3.0, 2.5]
