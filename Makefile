# Two entry points: `make book` builds the HTML book, `make test` runs the whole test suite.
# Both create .venv and install requirements.txt first (once, and again when it changes).
VENV ?= .venv
PY := $(VENV)/bin/python
# The book's stored runs were computed with these CPU kernels and re-run bit for bit on the same kind of CPU
# (src/gradclip_book/reproducibility.py, which also sets them when gradclip_book is imported first).
ifeq ($(shell uname -m),x86_64)
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2
export ONEDNN_MAX_CPU_ISA ?= AVX2
endif
STAMP := $(VENV)/.installed

.PHONY: setup book test install-cells clean

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

setup: $(STAMP)

book: setup
	GRADCLIP_STATIC=1 $(VENV)/bin/jupyter-book build --all -W --keep-going .
	test -f _build/html/index.html

test: setup
	$(PY) -m pytest tests chapters --nbval-lax --nbval-current-env

# Regenerate each chapter's hidden install cell from _config.yml (repository.url, branch).
install-cells: setup
	$(PY) tools/nbtool.py install-cells chapters/*.ipynb

clean:
	rm -rf _build build dist
