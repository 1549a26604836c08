# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
TEST_VENV := .venv-test
PYTEST_ARGS ?=

.PHONY: test demo stress bench clean mutation

$(TEST_VENV)/.ready: pyproject.toml
	rm -rf $(TEST_VENV)
	$(PY) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(TEST_VENV)/bin/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

# The image test needs podman & co.; a machine where they cannot be installed still runs the
# rest, and tests/test_image.py fails with the reason.
test: $(TEST_VENV)/.ready
	-bash tools/container-tools.sh
	$(TEST_VENV)/bin/python -m pytest -q --durations=10 $(PYTEST_ARGS)

stress: $(TEST_VENV)/.ready
	M3FUSE_STRESS=full $(TEST_VENV)/bin/python -m pytest -q -m stress $(PYTEST_ARGS)

# Mutation testing of one module against its own test selection (tools/mutation.py's table):
#   make mutation MODULE=m3fuse/patching/basechoice.py
#   make mutation MODULE=m3fuse/patching/basechoice.py SURVIVORS=1   (only the last run's survivors)
$(TEST_VENV)/.mutation: $(TEST_VENV)/.ready
	$(TEST_VENV)/bin/pip install -q --disable-pip-version-check -e ".[test,mutation]"
	touch $@

mutation: $(TEST_VENV)/.mutation
	@test -n "$(MODULE)" || { $(TEST_VENV)/bin/python tools/mutation.py --list; \
		echo "make mutation: pass MODULE=<one of the above>"; exit 2; }
	$(TEST_VENV)/bin/python tools/mutation.py $(MODULE) $(if $(SURVIVORS),--survivors)

demo:
	PY=$(PY) bash tools/demo.sh

bench: $(TEST_VENV)/.ready
	$(TEST_VENV)/bin/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(TEST_VENV) .demo build dist
