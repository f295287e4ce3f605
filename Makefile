# Quick start: `make demo` and `make test`; both set up .venv and the shipped corpus on first use.
SHELL := /bin/bash
PY := .venv/bin/python
VENV := .venv/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
DATA := data/.built
export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore

.PHONY: setup data test test-fast demo bench clean-data

setup: $(VENV)

$(VENV): requirements.txt pyproject.toml
	rm -f .venv/.installed-*
	test -x $(PY) || python3 -m venv .venv
	# torch first, pinned, so nothing below pulls a CUDA build of a newer torch.
	.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
	.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
	.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

data: $(DATA)

$(DATA): $(VENV) tools/fetch_corpus.sh tools/build_corpus.py tools/corpus_sources.py cherry_megatron/cli/tokenizer.py cherry_megatron/cli/preprocess.py
	bash tools/fetch_corpus.sh data/sources
	$(PY) tools/build_corpus.py --sources data/sources --output data/corpus
	cp data/corpus/SOURCES.md data/SOURCES.md
	$(PY) tools/train_tokenizer.py --input data/corpus/train.jsonl --vocab-size 8192 --model-prefix data/tokenizer/cherry_ko8k
	$(PY) tools/preprocess_data.py --input data/corpus/train.jsonl --tokenizer-model data/tokenizer/cherry_ko8k.model --output-prefix data/tokens/train_text_document
	$(PY) tools/preprocess_data.py --input data/corpus/heldout.jsonl --tokenizer-model data/tokenizer/cherry_ko8k.model --output-prefix data/tokens/heldout_text_document
	touch $@

test: $(DATA)
	$(PY) -m pytest -q -rs --timeout 900 tests

test-fast: $(DATA)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(DATA)
	bash launchers/demo.sh

bench: $(DATA)
	$(PY) bench/train_throughput.py

clean-data:
	rm -rf data/corpus data/tokenizer data/tokens data/.built
