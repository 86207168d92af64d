# make demo | make demo-video | make test | make bench | make docs -- each sets up what it needs on a fresh machine.
# A torch that is already importable (system or venv) is respected; otherwise the CPU build
# torch==2.13.0 is installed (an unpinned torch would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo demo-video test test-numerics bench lint docs setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,demo]'
	@touch $@

# Two workers (pytest-xdist), a test file each at a time; TEST_WORKERS=0 runs the suite in one process.
# --max-worker-restart=0: a worker that crashes (a segfault in compiled code, a test past its timeout)
# fails the run at once, naming the test, instead of being replaced (xdist's loadfile scheduler can
# deadlock after a replacement and then waits forever).
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --max-worker-restart=0)

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(XDIST) $(PYTEST_ARGS)

# The tests that compare floats across kernel paths, processes or implementations, again with AVX2
# kernels instead of the machine's widest (another CPU rounds this way): a tolerance read off one
# machine's rounding fails here. .ci/run runs it after `make test`.
test-numerics: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -m "numerics and not gpu" $(XDIST)

demo: $(STAMP)
	$(PY) -m vae_scale demo

# The same on clips: wan-tiny-video on camera-motion clips of the photographs, against trilinear.
demo-video: $(STAMP)
	$(PY) -m vae_scale demo --video

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
