# make demo / make test create .venv on first use and install exactly the lock (cluster/install.sh,
# the same install step as the container image). `make lock` regenerates the lock files.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The image installs requirements.lock; the test venv requirements-test.lock (the same pins plus the
# test extra). Both: Linux x86_64, CPython 3.11 (docs/deployment.md).
LOCK := requirements.lock
TEST_LOCK := requirements-test.lock
IMAGE ?= kissray:0.1.0-gpu
UV_VERSION := 0.13.9
UV := .venv-lock/bin/uv
UV_COMPILE := $(UV) pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" --quiet

.PHONY: test demo bench venv clean browser lock image

venv: $(VENV)/.installed

$(VENV)/.installed: $(TEST_LOCK) pyproject.toml cluster/install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	cluster/install.sh $(PY) $(TEST_LOCK) editable .
	touch $@

# Resolve both lock files from pyproject.toml and cluster/lock-pins.txt (torch, Ray); the test lock
# is constrained by the runtime lock, so every package the image ships has the version CI tests.
lock:
	test -x $(UV) || { $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q uv==$(UV_VERSION); }
	$(UV_COMPILE) --extra gpu --extra aws -c cluster/lock-pins.txt -o $(LOCK)
	$(UV_COMPILE) --extra gpu --extra aws --extra test -c $(LOCK) -o $(TEST_LOCK)

# The container image every manifest in cluster/ names (needs Docker; push it to your registry).
image:
	docker build -f cluster/Dockerfile -t $(IMAGE) .

# Browser tests need Debian's chromium + chromedriver (installed when missing and apt is usable).
# apt's output and errors stay visible; with CI set, a browser that cannot be installed fails the build
# (tests/test_report.py fails rather than skips there too).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; then exit 0; fi; \
	if [ -n "$$CI" ]; then echo "CI: chromium + chromedriver are required and could not be installed" >&2; exit 1; fi; \
	echo "no chromium: browser tests will be skipped (they fail when CI is set)"

# pytest exits 5 when it collects nothing; that is not a pass.
test: venv browser
	$(PY) -m pytest -q tests

demo: venv
	$(VENV)/bin/kissray demo --out demo-out

bench: venv
	$(PY) benchmarks/throughput.py --quick --json benchmarks/results/throughput-quick.json
	$(PY) benchmarks/decode_bench.py --scores --json benchmarks/results/decode-bench.json

clean:
	rm -rf $(VENV) .venv-lock demo-out build dist
