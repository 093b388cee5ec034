# daad-inspect: `make demo` runs the main job, `make test` runs the test suite.
# Both work on a fresh machine with only Python and apt: they create .venv and install what is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch for the desktop/CI path (the CUDA build is ~3 GB); override for a GPU machine,
# e.g. make TORCH_SPEC="torch" setup
TORCH_SPEC ?= torch==2.13.0
APT_PACKAGES ?= mosquitto shellcheck systemd
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Mosquitto (tests use a real broker), shellcheck and systemd-analyze (tests of systemd/).
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# The end-to-end demo (DATA=path/to/mvtec_category to use real images instead of generated ones).
demo: setup system-deps
	$(PY) scripts/demo.py $(if $(DATA),--data $(DATA),) $(DEMO_ARGS)

test: setup system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
