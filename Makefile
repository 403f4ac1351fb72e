# make demo / make test create .venv on first use and install everything needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pinned: the only torch on this machine's package sources with a matching torchaudio.
TORCH_PINS := torch==2.9.1 torchvision==0.24.1

.PHONY: test demo bench venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PINS)
	$(PIP) install $(TORCH_PINS) 'torchaudio==2.9.*'
	$(PIP) install $(TORCH_PINS) 'torchaudio==2.9.*' -e '.[test]'
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(VENV)/bin/kissray demo --out demo-out

bench: venv
	$(PY) benchmarks/throughput.py --quick --json benchmarks/results/throughput-quick.json

clean:
	rm -rf $(VENV) demo-out
