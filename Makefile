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
.PHONY: help setup demo test lint format ui bench clean list grid report

help:  ## list the targets
	@grep -E '^[a-zA-Z_/%.-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 28

# llama-cpp-python (dev extra: the local endpoint) is built from source, ~5 min on 2 cores, then
# cached by pip; llama.cpp's native build (-march=native) dies here with an illegal instruction
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv (when missing) and install the package with its dev tools

demo: $(DEMO)/eval/demo_vqa/scores.json $(DEMO)/eval/demo_vqa_answer/scores.json $(DEMO)/judge/manifest.json  ## the main job on the embedded demo: generate, rate (local SmolLM2), selector fit, score, select, tune LLaVA, test, answer (served), judge
	@echo "selected: $(DEMO)/selected/selected.json; tuned: $(DEMO)/tuner/export/; VQA: $(DEMO)/eval/demo_vqa/scores.json (served: $(DEMO)/eval/demo_vqa_answer/scores.json); chat answers: $(DEMO)/eval/demo_chat/predictions.jsonl; judge: $(DEMO)/judge/manifest.json — runs: make ui"
	@$(BIN)/python -c "$$DEMO_VQA_SIDE_BY_SIDE"

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
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install --quiet -e '.[report]'
	$(BIN)/python experiments/report.py --grid $(GRID)

$(DEMO)/tuner/export/run.json: $(DEMO)/selected/manifest.json conf/demo/tuner.yaml
	$(BIN)/python -m biomedvital fit --config conf/demo/tuner.yaml

data/demo_vqa/demo_vqa.json: $(STAMP)
	$(BIN)/python -m biomedvital demo-vqa

$(DEMO)/eval/demo_vqa/scores.json: $(DEMO)/tuner/export/run.json data/demo_vqa/demo_vqa.json conf/eval/demo_vqa.yaml
	$(BIN)/python -m biomedvital test --config conf/eval/demo_vqa.yaml

# the same export served by transformers serve (a free loopback port, stopped after the run)
# answers the same questions through `answer`: same prompt, greedy, scored by the same metrics
$(DEMO)/eval/demo_vqa_answer/scores.json: $(DEMO)/tuner/export/run.json data/demo_vqa/demo_vqa.json conf/eval/demo_vqa.yaml
	$(BIN)/python -m biomedvital answer --config conf/eval/demo_vqa.yaml \
		--client.base_url local-hf:$(DEMO)/tuner/export --client.model biomedvital-demo \
		--trainer.default_root_dir $(DEMO)/eval/demo_vqa_answer --progress false > /dev/null

define DEMO_VQA_SIDE_BY_SIDE
import json
t, a = (json.load(open(f"$(DEMO)/eval/{d}/scores.json")) for d in ("demo_vqa", "demo_vqa_answer"))
keys = ("open_recall", "closed_acc", "answered", "partial")
cell = lambda v: f"{v:>13.2f}" if type(v) is float else f"{v!s:>13}"
print("demo VQA        " + "".join(f"{k:>13}" for k in keys))
for name, s in (("test", t), ("answer (served)", a)):
    print(f"{name:<16}" + "".join(cell(s.get(k)) for k in keys))
endef
export DEMO_VQA_SIDE_BY_SIDE

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

ui: $(STAMP)  ## open the MLflow UI on the project's store (mlruns/mlflow.db)
	$(BIN)/python -c "import flask" 2>/dev/null || $(BIN)/pip install --quiet -e '.[ui]'
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --port 5000

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
