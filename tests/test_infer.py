"""Loading a GGUF: what would crash llama.cpp is refused first; threads follow the CPUs this process has; a
tokenizer is read once per process."""

import os

import llama_cpp
import pytest

from fasttune import UserError, cached_tokenizer, cpu_threads, infer
from tests.conftest import model_folder


def test_a_quantized_file_under_an_amx_build_is_refused_with_the_fix(trained_run, monkeypatch):
    gguf_dir = trained_run[0] / "gguf"
    infer.check_runnable(gguf_dir / "memorize-q4_k_m.gguf")  # this build (make install): no AMX kernels
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"AVX512 = 1 | AMX_INT8 = 1 | ")
    with pytest.raises(UserError, match="memorize-q4_k_m.gguf: this llama-cpp-python was built with llama.cpp's "
                                        "AMX kernels.*-mno-amx-int8"):
        infer.check_runnable(gguf_dir / "memorize-q4_k_m.gguf")
    infer.check_runnable(gguf_dir / "memorize-bf16.gguf")  # 16-bit files never reach those kernels
    with pytest.raises(UserError, match="no such GGUF file"):
        infer.check_runnable(gguf_dir / "missing.gguf")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity mask on this OS")
def test_threads_are_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.delenv("FASTTUNE_THREADS", raising=False)
    assert 1 <= cpu_threads() <= len(os.sched_getaffinity(0))  # the affinity mask, or less under a CPU quota
    monkeypatch.setenv("FASTTUNE_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.setenv("FASTTUNE_THREADS", "all")
    with pytest.raises(UserError, match="FASTTUNE_THREADS='all': expected a whole number"):
        cpu_threads()


def test_a_tokenizer_is_loaded_once_until_its_folder_s_files_change(tmp_path, tiny_dir):
    folder = model_folder(tmp_path, tiny_dir, weights=False)
    first = cached_tokenizer(folder)
    assert cached_tokenizer(folder) is first and cached_tokenizer(str(folder) + "/") is first
    template = folder / "chat_template.jinja"
    stat = template.stat()
    # a rewrite of the same size that keeps the timestamps (a copy with cp -p, a merge within one clock tick)
    before = template.read_text()
    template.write_text(before.replace("You are Qwen", "You are Kwen", 1))
    os.utime(template, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert template.stat().st_size == stat.st_size and template.read_text() != before
    changed = cached_tokenizer(folder)
    assert changed is not first and changed.chat_template == template.read_text()
    # not a folder: a hub name, loaded as transformers would (its own error, offline or not)
    with pytest.raises(OSError, match="couldn't find them in the cached files|not a valid model identifier"):
        cached_tokenizer("no-such-org/no-such-model")


def test_all_layers_go_to_the_gpu_when_the_build_can_offload(monkeypatch):
    monkeypatch.delenv("FASTTUNE_GPU_LAYERS", raising=False)
    assert infer.gpu_layers(supports_offload=True) == -1
    assert infer.gpu_layers(supports_offload=False) == 0
    # this build: make install builds CUDA only where nvcc is
    assert infer.gpu_layers() == (-1 if llama_cpp.llama_supports_gpu_offload() else 0)
    monkeypatch.setenv("FASTTUNE_GPU_LAYERS", "0")  # the CPU while the GPU trains
    assert infer.gpu_layers(supports_offload=True) == 0
    monkeypatch.setenv("FASTTUNE_GPU_LAYERS", "12")
    assert infer.gpu_layers(supports_offload=False) == 12
    for bad in ("all", "-2", "1.5", "--1", " 3"):
        monkeypatch.setenv("FASTTUNE_GPU_LAYERS", bad)
        with pytest.raises(UserError, match=f"FASTTUNE_GPU_LAYERS='{bad}': expected a whole number"):
            infer.gpu_layers()


def test_load_asks_llama_cpp_for_the_offload(trained_run, monkeypatch):
    monkeypatch.setenv("FASTTUNE_GPU_LAYERS", "7")
    with infer.load(trained_run[0] / "gguf" / "memorize-bf16.gguf", n_ctx=256) as llm:
        assert llm.model_params.n_gpu_layers == 7


def test_a_context_past_the_rope_s_original_one_is_warned_about():
    """Phi-3's longrope: llama.cpp takes the long factors for every token once the context passes the
    original one (training used the short ones); a file without an original context gets no warning."""
    phi3 = {"general.architecture": "phi3", "phi3.rope.scaling.original_context_length": "4096"}
    assert infer.original_context(phi3) == 4096
    assert infer.context_warning("m.gguf", 4096, phi3) is None
    assert "a 8192-token context is past the model's original 4096" in infer.context_warning("m.gguf", 8192, phi3)
    assert infer.context_warning("m.gguf", 131072, {"general.architecture": "qwen2"}) is None
