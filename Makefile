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

test: setup
	@rc=0; $(PY) -m pytest tests/unit tests/inprocess tests/server -x -q -ra --durations=15 || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

lint: setup
	$(PY) -m ruff check .
