# lesionlapse: `make demo` and `make test` are the two set-up commands of the README.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= test,notebooks
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
DEMO_OUT ?= demo_output
PYTEST_ARGS ?=

.PHONY: install demo test clean

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) sh scripts/install.sh $(VENV) $(EXTRAS)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python scripts/demo.py --out $(DEMO_OUT)

# 2 pytest-xdist workers; the tests of an expensive shared fixture share one (tests/conftest.py)
test: $(STAMP)
	sh scripts/install_system_deps.sh
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
