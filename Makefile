# make demo | make test | make bench | make docs -- each sets up what it needs on a fresh machine.
# A torch that is already importable (system or venv) is respected; otherwise the CPU build
# torch==2.13.0 is installed (an unpinned torch would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint docs setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,demo]'
	@touch $@

# Two workers (pytest-xdist), a test file each at a time; TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

demo: $(STAMP)
	$(PY) -m vae_scale demo

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# docs/configuration.md from the config's field docstrings; written whole or not at all.
docs: $(STAMP)
	$(PY) -m vae_scale.config_reference > docs/configuration.md.tmp || { rm -f docs/configuration.md.tmp; exit 1; }
	mv docs/configuration.md.tmp docs/configuration.md

clean:
	rm -rf $(VENV) *.egg-info
