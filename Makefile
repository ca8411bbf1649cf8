# biomedvital — targets are result files where there is a result; `make help` lists them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    := outputs/demo
PYTEST_ARGS ?=

GRID    ?= w
GRID_FILE = conf/grids/$(GRID).yaml
GRID_ROOT = outputs/grids
GRID_DIR  = $(GRID_ROOT)/$(GRID)
# make grid REUSE_STALE=true keeps finished cells whose code, configs or inputs changed (the
# report marks them); make report ALLOW_MIXED=true summarises runs of different library hashes,
# PUBLISH=true writes the committed, citable copy (experiments/reports/published/GRID/; for
# make bench, bench/results/published/)
REUSE_STALE ?= false
ALLOW_MIXED ?= false
PUBLISH     ?= false
GRID_ARGS  = --grid $(GRID_FILE) --out_root $(GRID_ROOT) --reuse_stale $(REUSE_STALE)
# the cells of GRID that would run: new ones and those whose stages' identity (command, config
# contents, inputs, library hash) changed since they ran; read when the grid recipe runs, after
# the NEEDS are made (one target per cell: its cell.json)
TO_RUN    = $(shell $(BIN)/python -m biomedvital grid $(GRID_ARGS) --stale true 2>/dev/null)
# files the grid's cells read that make makes first (e.g. the demo selector's scores for
# GRID=topk); the inputs a user provides (the paper grids' data) are checked by the plan
NEEDS     = $(shell $(BIN)/python -m biomedvital grid --grid $(GRID_FILE) --needs true 2>/dev/null)

.DEFAULT_GOAL := help
.PHONY: help setup lock demo demo-chain test test-heavy lint format ui bench clean list plan grid report FORCE

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

# The chain's stages after the tuned export (test, answer, chat answers, judge) are independent:
# the demo runs two at a time (DEMO_JOBS), each one's output kept together (--output-sync).
DEMO_JOBS ?= 2

demo:  ## the main job on the embedded demo: generate, rate (local SmolLM2), selector fit, score, select, tune LLaVA, test, answer (served), judge
	@$(MAKE) --no-print-directory -j$(DEMO_JOBS) --output-sync=target demo-chain

demo-chain: $(DEMO)/eval/demo_vqa/scores.json $(DEMO)/eval/demo_vqa_answer/scores.json $(DEMO)/judge/manifest.json
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

plan: $(STAMP)  ## which cells of GRID are new or stale and why, each stage's command, GPU-hours and API cost
	@$(BIN)/python -m biomedvital grid $(GRID_ARGS) --plan true

# the plan is printed first (and a missing or broken grid file, or an input the user provides
# missing, stops make there with its error, instead of an empty TO_RUN running nothing and
# exiting 0, or every cell failing on the same missing file); a cell's target is always remade
# when asked for (FORCE): grid.py decides which of its stages run, so a finished cell whose code
# or configs changed is entered again
grid: $(STAMP) $(NEEDS)  ## run the cells of GRID that are new or stale (make plan says which; -k keeps going, -j in parallel)
	@$(BIN)/python -m biomedvital grid $(GRID_ARGS) --plan true --check_needs true
	$(if $(strip $(TO_RUN)),@$(MAKE) --no-print-directory $(foreach c,$(TO_RUN),$(GRID_DIR)/$(c)/cell.json),@echo "[grid] $(GRID): nothing to run")

$(GRID_DIR)/%/cell.json: FORCE
	$(BIN)/python -m biomedvital grid $(GRID_ARGS) --cell $*

FORCE:

report: $(STAMP)  ## table (Markdown, CSV) and plots of GRID's runs from MLflow, under experiments/reports/ (PUBLISH=true: the committed copy)
	$(BIN)/python experiments/report.py --grid $(GRID) --grid_file $(GRID_FILE) --grid_root $(GRID_ROOT) \
		--allow_mixed $(ALLOW_MIXED) --publish $(PUBLISH)

$(DEMO)/tuner/export/run.json: $(DEMO)/selected/manifest.json conf/demo/tuner.yaml
	$(BIN)/python -m biomedvital fit --config conf/demo/tuner.yaml

# one run writes both files (a grouped target: run once, also under -j); after generate (order
# only): both write the demo pool in data/demo on first use
data/demo_vqa/demo_vqa.json data/demo_vqa/demo_chat.jsonl &: $(STAMP) | $(DEMO)/generate/manifest.json
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


# the tuned model answers the chat questions (LLaVA-Med-Bench layout), as on the real benchmark
$(DEMO)/eval/demo_chat/scores.json: $(DEMO)/tuner/export/run.json data/demo_vqa/demo_chat.jsonl conf/eval/demo_chat.yaml
	$(BIN)/python -m biomedvital test --config conf/eval/demo_chat.yaml

# the local SmolLM2 judges those answers against the reference answers
$(DEMO)/judge/manifest.json: $(DEMO)/eval/demo_chat/scores.json data/demo_vqa/demo_chat.jsonl conf/demo/judge.yaml
	$(BIN)/python -m biomedvital judge --config conf/demo/judge.yaml

test: $(STAMP)  ## run the test suite (tiny models, CPU; add PYTEST_ARGS="-m slow" for the long checks)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-heavy: $(STAMP)  ## the end-to-end and multi-process checks that make test leaves to CI's second step
	$(BIN)/python -m pytest -m heavy $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff lint and format check, import contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)  ## apply ruff formatting and fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

UI_PORT ?= 5000
ui: $(STAMP)  ## open the MLflow UI on the project's store (mlruns/mlflow.db) at http://127.0.0.1:$(UI_PORT)
	$(BIN)/python -m biomedvital ui --store mlruns --port $(UI_PORT)

# the commands docs/performance.md quotes; PUBLISH=true writes each result to
# bench/results/published/ (committed, cited there; refused with uncommitted code)
BENCH = $(BIN)/python bench
BENCH_PUBLISH = --publish $(PUBLISH)
bench: $(STAMP) $(DEMO)/selected/manifest.json  ## run the benchmarks docs/performance.md quotes, ratios against the reference recipe (PUBLISH=true: the committed copies it cites)
	$(BENCH)/scoring_throughput.py $(BENCH_PUBLISH)
	$(BENCH)/scoring_throughput.py --backbone tiny:tiny-clip --copies 8 $(BENCH_PUBLISH)
	$(BENCH)/w_grid.py $(BENCH_PUBLISH)
	$(BENCH)/w_grid.py --copies 12 --repeats 2 $(BENCH_PUBLISH)
	$(BENCH)/streaming_memory.py $(BENCH_PUBLISH)
	$(BENCH)/generation_throughput.py $(BENCH_PUBLISH)
	$(BENCH)/generation_memory.py $(BENCH_PUBLISH)
	$(BENCH)/tuner_padding.py $(BENCH_PUBLISH)
	$(BENCH)/tuner_activation_memory.py --size 13b $(BENCH_PUBLISH)
	$(BENCH)/tuner_mfu.py --dry-run
	$(BENCH)/eval_decode.py $(BENCH_PUBLISH)
	$(BENCH)/eval_processes.py $(BENCH_PUBLISH)
	$(BENCH)/eval_endpoint.py --repeat 4 --trials 3 $(BENCH_PUBLISH)

clean:  ## remove demo outputs (keeps .venv and mlruns)
	rm -rf outputs data/demo data/demo_vqa
