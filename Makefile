# dmdr developer entry points. Fresh machine with Python 3.11:
#   make demo   # create .venv, install dmdr, run the default job on the built-in tiny model
#   make test   # create/update .venv with the dev extras, run the whole offline test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# pinned, tested versions; torch 2.14.1 + torchvision 0.29.1 install from the local wheel cache with plain pip
CONSTRAINTS := constraints.txt
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) | sha256sum | cut -c1-12)
DEMO_OUT ?= demo-out

.PHONY: install demo test clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr sample "a red circle" "a blue square above a green triangle" \
		--base tiny-sd3 --steps 4 --n 2 --grid --out $(DEMO_OUT)/student-4step
	HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr sample "a red circle" "a blue square above a green triangle" \
		--base tiny-sd3 --n 2 --grid --out $(DEMO_OUT)/teacher
	@echo "demo written to $(DEMO_OUT)/ (grid.png in each folder)"

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(DEMO_OUT) build dist *.egg-info
