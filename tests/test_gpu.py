"""The GPU tier (`make test-gpu`): the same training path on CUDA, through Unsloth's kernels.

Skipped without CUDA. ../shared/GPU.md lists what a GPU machine without network needs.
"""

import pytest
import torch

from fasttune import model as model_lib
from fasttune import train
from fasttune.config import Config, DataConfig, ExportConfig, ModelConfig, TrainConfig
from tests.test_train import training_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qlora_trains_on_cuda(tmp_path, memorized_chats):
    cfg = Config(
        ModelConfig(model="tiny", lora_r=16, max_seq_length=256),
        DataConfig(data="memorize.jsonl"),
        TrainConfig(out=str(tmp_path), epochs=15, learning_rate=3e-3, batch_size=4, seed=0),
        ExportConfig(quants=[]),
    )
    torch.cuda.reset_peak_memory_stats()
    model, tokenizer = model_lib.load_for_training(cfg.model, seed=0)
    assert next(model.parameters()).is_cuda
    trainer = train.train(model, tokenizer, training_data(memorized_chats, tokenizer), cfg, tmp_path)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    assert torch.cuda.max_memory_allocated() > 0


def test_llama_cpp_offloads_and_answers_as_on_the_cpu(trained_run, monkeypatch):
    """`make install` built llama.cpp with CUDA here; every layer on the GPU gives the CPU's greedy answer."""
    import llama_cpp

    from fasttune import infer

    assert llama_cpp.llama_supports_gpu_offload(), "make install found no nvcc: llama-cpp-python is a CPU build"
    assert infer.gpu_layers() == -1
    answers = {}
    for layers in ("0", "-1"):
        monkeypatch.setenv("FASTTUNE_GPU_LAYERS", layers)
        with infer.load(trained_run[0] / "gguf" / "memorize-bf16.gguf", n_ctx=512) as llm:
            ids = llm.tokenize(b"<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", special=True)
            answers[layers] = [t for _, t in zip(range(16), llm.generate(ids, temp=0.0))]
    assert answers["0"] == answers["-1"]
