# The README's two commands: `make book` and `make test`. Both create .venv when it is
# missing and (re)install only when pyproject.toml or constraints.txt changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := book,test,eval,teach,dev
# exact torch pair that installs offline here; pyproject.toml keeps ranges for Colab
TORCH := torch==2.14.1 torchvision==0.29.1
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test book notebooks student bench lint clean help

help:
	@echo "make book   build the book (_build/html) with every notebook executed offline"
	@echo "make test   run all tests, nbval over notebooks/ included"
	@echo "make notebooks [NB=01_dataset]  execute notebooks/*.py into notebooks/*.ipynb (commit them)"
	@echo "make student  student notebooks (solutions and hidden tests removed) into student/"
	@echo "make bench  run benchmarks/ and write benchmarks/results/*.json"
	@echo "make clean  remove build outputs and caches (keeps .venv; 'make distclean' removes it)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	@echo "== installing into $(VENV) (torch pinned by constraints.txt)"
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e ".[$(EXTRAS)]"
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 -p no:cacheprovider

book: $(STAMP)
	$(VENV)/bin/jupyter-book build -W -n --keep-going .

notebooks: $(STAMP)
	$(PY) tools/notebooks.py execute $(NB)

student: $(STAMP)
	$(PY) tools/student.py --out student

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check caption_lib tests benchmarks

clean:
	rm -rf _build student .pytest_cache .hypothesis .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data runs
