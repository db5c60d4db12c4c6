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
# MathJax served by the book itself (maths renders offline): the npm package, pinned and verified
MATHJAX_VERSION := 3.2.2
MATHJAX_SHA256 := 1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09
MATHJAX_URL := https://registry.npmjs.org/mathjax/-/mathjax-$(MATHJAX_VERSION).tgz
MATHJAX := _vendor/mathjax/tex-mml-chtml.js
# the browser check drives Debian's Chromium (Playwright cannot download browsers here)
CHROMIUM ?= /usr/bin/chromium

# make test over every core: whole files per worker process (a notebook's cells in one kernel),
# the longest files first (the root conftest's SLOWEST; it also gives each worker its share
# of the threads). XDIST= runs the suite in one process.
XDIST ?= -n auto --dist loadfile --no-loadscope-reorder

.PHONY: install runs test colab-check book check-book browser mathjax notebooks student bench lint clean help

help:
	@echo "make book   build the book (_build/html) with every notebook executed offline"
	@echo "make test   run all tests, nbval over notebooks/ included"
	@echo "make runs   build the shapes data and train the runs the chapters load (progress bars; a no-op once done)"
	@echo "make colab-check  every chapter with DATASET=flickr8k on a tiny local Flickr8k mirror (offline)"
	@echo "make check-book  open every page of _build/html in headless Chromium; screenshots in _build/screenshots/"
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

# the data set and every run the chapters load, trained here with their progress bars, so
# that `make book` / `make test` show progress and the notebooks load the finished runs
runs: $(STAMP)
	$(PY) tools/book_runs.py

test: $(STAMP) $(MATHJAX) runs
	-@$(MAKE) --no-print-directory browser
	$(PY) -m pytest tests notebooks $(XDIST) --nbval-lax --nbval-current-env --nbval-cell-timeout=1200 --durations=15 -p no:cacheprovider

# the Colab path: every chapter with DATASET = "flickr8k" against a tiny local Flickr8k
# mirror with planted weights, offline (tests/test_colab.py; also part of `make test`)
colab-check: $(STAMP)
	$(PY) -m pytest tests/test_colab.py -m colab --durations=0 -p no:cacheprovider

book: $(STAMP) $(MATHJAX) runs
	$(VENV)/bin/jupyter-book build -W -n --keep-going .

mathjax: $(MATHJAX)

$(MATHJAX):
	@echo "== MathJax $(MATHJAX_VERSION) from the npm registry into _vendor/mathjax/"
	@mkdir -p _vendor/mathjax
	curl -fsSL --retry 3 -o _vendor/mathjax.tgz $(MATHJAX_URL)
	echo "$(MATHJAX_SHA256)  _vendor/mathjax.tgz" | sha256sum --check --quiet
	tar -xzf _vendor/mathjax.tgz -C _vendor/mathjax --strip-components=2 package/es5
	rm _vendor/mathjax.tgz
	@test -f $@

# Debian's Chromium; installed with apt-get when missing and we may (root on Debian)
browser:
	@test -x $(CHROMIUM) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && apt-get install -y --no-install-recommends chromium; } \
	  || { echo "make browser: $(CHROMIUM) missing; install Debian's chromium (apt-get install chromium)"; exit 1; }

check-book: $(STAMP) browser
	$(PY) tools/check_book.py --site _build/html --toc _toc.yml --screenshots _build/screenshots --chromium $(CHROMIUM)

notebooks: $(STAMP)
	$(PY) tools/notebooks.py execute $(NB)

student: $(STAMP)
	$(PY) tools/student.py --out student

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done
	@$(PY) benchmarks/summary.py

lint: $(STAMP)
	$(VENV)/bin/ruff check caption_lib tests benchmarks tools

clean:
	rm -rf _build _vendor student .pytest_cache .hypothesis .ruff_cache
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data runs
