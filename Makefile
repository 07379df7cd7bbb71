# ComfyUI-IPAdapter-Exact: developer entry points. All targets are idempotent and honour
# COMFYUI_PATH (use your own ComfyUI checkout instead of the bundled 0.3.75 copy).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PY := .venv/bin/python
# pip on some hosts warns about every configured wheel location; keep real errors only.
QUIET_PIP := grep -v -E 'WARNING: Location .* is ignored' || true

.PHONY: setup demo test lint

setup:
	@scripts/bootstrap.sh 2>&1 | { $(QUIET_PIP); }

demo: setup
	$(PY) scripts/demo.py

# Two pytest processes: the release matrix apart, so that its child interpreters (one per ComfyUI
# tree) do not share the 24 GB with the in-process models and the suite's own server.
PYTEST_ARGS := -x -q -ra
test: setup
	@mkdir -p .test-artifacts; rm -f .test-artifacts/junit-*.xml; rc=0; \
	$(PY) -m pytest tests/unit tests/inprocess tests/server --ignore=tests/server/test_release_matrix.py \
		$(PYTEST_ARGS) --junitxml=.test-artifacts/junit-suite.xml || rc=$$?; \
	if [ $$rc -eq 0 ]; then \
		$(PY) -m pytest tests/server/test_release_matrix.py $(PYTEST_ARGS) \
			--junitxml=.test-artifacts/junit-releases.xml || rc=$$?; \
	fi; \
	$(PY) scripts/slowest_tests.py 15 .test-artifacts/junit-*.xml || true; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

lint: setup
	$(PY) -m ruff check .
