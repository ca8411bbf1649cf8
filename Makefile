# biomedvital — targets are result files where there is a result; `make help` lists them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    := outputs/demo
PYTEST_ARGS ?=

GRID    ?= w
GRID_FILE = conf/grids/$(GRID).yaml
GRID_DIR  = outputs/grids/$(GRID)
# the cells of GRID, read from its file (one target per cell: its cell.json, written when all
# of the cell's stages are done)
CELLS     = $(shell $(BIN)/python -m biomedvital grid --grid $(GRID_FILE) 2>/dev/null)
# files the grid's cells read (e.g. the demo selector's scores for GRID=topk): made first
NEEDS     = $(shell $(BIN)/python -m biomedvital grid --grid $(GRID_FILE) --needs true 2>/dev/null)

.DEFAULT_GOAL := help
.PHONY: help setup lock demo test lint format ui bench clean list grid report

help:  ## list the targets
	@grep -E '^[a-zA-Z_/%.-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 28

# llama-cpp-python (dev extra: the local endpoint) is built from source, then cached by uv;
# llama.cpp's native build (-march=native) dies here with an illegal instruction. The Python
# package loads libllama and libggml only: llama.cpp's multimodal (LLAVA_BUILD) and common
# libraries (tools/llama_cpp_python.cmake) are not built, 74 of the 178 objects of a full build.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/tools/llama_cpp_python.cmake

# The environment is requirements.lock (every dependency and extra: versions and hashes, no
# machine's paths), installed by uv, itself pinned and hashed in the lock. UV_SOURCES gives uv
# the package sources pip is configured with here (local wheels: torch comes from disk).
LOCK       := requirements.lock
UV         := $(BIN)/uv
UV_SOURCES  = $(shell $(PY) tools/uv_sources.py)

# the venv (when missing) and uv in it, from the lock's pinned and hashed uv line
define venv_with_uv
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	test -x $(UV) || { awk '/^uv==/{p=1} p{print} p && !/\\$$/{exit}' $(LOCK) > $(VENV)/uv-requirement.txt \
		&& $(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(VENV)/uv-requirement.txt; }
endef

$(STAMP): pyproject.toml $(LOCK)
	$(venv_with_uv)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(UV) pip sync --python $(BIN)/python --require-hashes $(UV_SOURCES) $(LOCK)
	$(UV) pip install --python $(BIN)/python --no-deps $(UV_SOURCES) -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv (when missing) and install requirements.lock (all extras) and the package

lock:  ## refresh requirements.lock from pyproject.toml (resolved on PyPI; pins: requirements-pins.txt)
	$(venv_with_uv)
	$(UV) pip compile pyproject.toml --all-extras --universal --generate-hashes \
		-c requirements-pins.txt --custom-compile-command "make lock" -o $(LOCK)
	$(BIN)/python tools/lock_fingerprint.py --write $(LOCK)

demo: $(DEMO)/eval/demo_vqa/scores.json $(DEMO)/judge/manifest.json  ## the main job on the embedded demo: generate, rate (local SmolLM2), selector fit, score, select, tune LLaVA, test, judge
	@echo "selected: $(DEMO)/selected/selected.json; tuned: $(DEMO)/tuner/export/; VQA: $(DEMO)/eval/demo_vqa/scores.json; chat answers: $(DEMO)/eval/demo_chat/predictions.jsonl; judge: $(DEMO)/judge/manifest.json — runs: make ui"

# generate and rate start a local OpenAI-compatible server (llama-cpp-python, SmolLM2-135M) on a
# free loopback port for the stage and stop it after (client.base_url: local:smollm2 in their
# configs; --config conf/endpoints/openai.yaml after a verb's config points it at OpenAI instead)
$(DEMO)/generate/manifest.json: $(STAMP) conf/demo/generate.yaml
	$(BIN)/python -m biomedvital demo --out_dir data/demo > /dev/null
	$(BIN)/python -m biomedvital generate --config conf/demo/generate.yaml

$(DEMO)/rate/manifest.json: $(DEMO)/generate/manifest.json conf/demo/rate.yaml
	$(BIN)/python -m biomedvital rate --config conf/demo/rate.yaml

# the generated, rated candidates join the demo's hand-written pool (conf/demo/generated_pool.yaml)
SELECTOR_CONF := --config conf/demo/selector.yaml --config conf/demo/generated_pool.yaml

$(DEMO)/selector/checkpoints/last.ckpt: $(DEMO)/rate/manifest.json conf/demo/selector.yaml conf/demo/generated_pool.yaml
	$(BIN)/python -m biomedvital fit $(SELECTOR_CONF)

$(DEMO)/selector/scores.jsonl: $(DEMO)/selector/checkpoints/last.ckpt
	$(BIN)/python -m biomedvital predict $(SELECTOR_CONF) --ckpt_path $<

$(DEMO)/selected/manifest.json: $(DEMO)/selector/scores.jsonl
	$(BIN)/python -m biomedvital select --scores $< \
		--candidates '[data/demo/candidates.jsonl, $(DEMO)/generate/candidates.jsonl]' \
		--out $(DEMO)/selected --top_percent 80

list: $(STAMP)  ## list the cells of a grid: make list GRID=w (grids live in conf/grids/)
	@$(BIN)/python -m biomedvital grid --grid $(GRID_FILE)

# CELLS is empty when the grid file is missing or broken (its error went to /dev/null): the grid
# is read once more here so that make stops with that error, instead of a sub-make with no
# target running the default goal and exiting 0
grid: $(STAMP) $(NEEDS)  ## run the cells of GRID not yet done (make -k keeps going, make -n shows them)
	@$(BIN)/python -m biomedvital grid --grid $(GRID_FILE) > /dev/null
	@$(MAKE) --no-print-directory $(foreach c,$(CELLS),$(GRID_DIR)/$(c)/cell.json)

$(GRID_DIR)/%/cell.json: $(GRID_FILE)
	$(BIN)/python -m biomedvital grid --grid $(GRID_FILE) --cell $*

report: $(STAMP)  ## table (Markdown, CSV) and plots of GRID's runs from MLflow, under experiments/reports/
	$(BIN)/python experiments/report.py --grid $(GRID)

$(DEMO)/tuner/export/run.json: $(DEMO)/selected/manifest.json conf/demo/tuner.yaml
	$(BIN)/python -m biomedvital fit --config conf/demo/tuner.yaml

data/demo_vqa/demo_vqa.json: $(STAMP)
	$(BIN)/python -m biomedvital demo-vqa

$(DEMO)/eval/demo_vqa/scores.json: $(DEMO)/tuner/export/run.json data/demo_vqa/demo_vqa.json conf/eval/demo_vqa.yaml
	$(BIN)/python -m biomedvital test --config conf/eval/demo_vqa.yaml

data/demo_vqa/demo_chat.jsonl: data/demo_vqa/demo_vqa.json  # written with it (missing: older demo-vqa)
	$(BIN)/python -m biomedvital demo-vqa

# the tuned model answers the chat questions (LLaVA-Med-Bench layout), as on the real benchmark
$(DEMO)/eval/demo_chat/scores.json: $(DEMO)/tuner/export/run.json data/demo_vqa/demo_chat.jsonl conf/eval/demo_chat.yaml
	$(BIN)/python -m biomedvital test --config conf/eval/demo_chat.yaml

# the local SmolLM2 judges those answers against the reference answers
$(DEMO)/judge/manifest.json: $(DEMO)/eval/demo_chat/scores.json data/demo_vqa/demo_chat.jsonl conf/demo/judge.yaml
	$(BIN)/python -m biomedvital judge --config conf/demo/judge.yaml

test: $(STAMP)  ## run the test suite (tiny models, CPU; add PYTEST_ARGS="-m slow" for the long checks)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff formatting and fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

UI_PORT ?= 5000
ui: $(STAMP)  ## open the MLflow UI on the project's store (mlruns/mlflow.db) at http://127.0.0.1:$(UI_PORT)
	$(BIN)/python -m biomedvital ui --store mlruns --port $(UI_PORT)

bench: $(STAMP)  ## run the benchmarks in bench/ (prints ratios against the reference recipe)
	$(BIN)/python bench/scoring_throughput.py
	$(BIN)/python bench/w_grid.py
	$(BIN)/python bench/streaming_memory.py
	$(BIN)/python bench/generation_throughput.py
	$(BIN)/python bench/generation_memory.py
	$(BIN)/python bench/tuner_padding.py
	$(BIN)/python bench/tuner_activation_memory.py
	$(BIN)/python bench/tuner_mfu.py --dry-run
	$(BIN)/python bench/eval_decode.py
	$(BIN)/python bench/eval_processes.py

clean:  ## remove demo outputs (keeps .venv and mlruns)
	rm -rf outputs data/demo data/demo_vqa
