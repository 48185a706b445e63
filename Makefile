# Two set-up commands: `make run` and `make test`. Both create .venv and install what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
ARGS ?=

.PHONY: run test lint typecheck check-java lock clean

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory check-java
	@test -x $(PY) || python3.11 -m venv $(VENV) 2>/dev/null || python3 -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	$(PY) -m pip install -q --upgrade pip wheel
	@# torch first, exactly 2.13.0: the machine's local CPU wheel; any other pin pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

check-java:
	@v=$$(java -version 2>&1 | awk -F'"' '/version/ {print $$2}' | cut -d. -f1); \
	if [ -z "$$v" ] || [ "$$v" -lt 17 ]; then \
	  echo "Java >= 17 is required by RayDP/Spark (found: $${v:-none})."; \
	  echo "Install it with: sudo apt-get install -y openjdk-17-jdk-headless"; \
	  exit 1; \
	fi

run: $(STAMP)
	$(PY) -m jobs.pipeline --config configs/pipeline/local.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy market cluster jobs configs models serve bench
	$(VENV)/bin/lint-imports
	$(PY) -m pytest $(PYTEST_ARGS)

lock: $(STAMP)
	@( echo "# Lock of the whole resolved dependency set: make installs with -c constraints.txt."; \
	   echo "# Regenerate with: make lock"; \
	   $(PY) -m pip freeze | grep -v -i -e '^-e' -e 'quant-ai' | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' ) > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
