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

DEMO_PROMPTS := "a red circle" "a blue square" "a green star left of a yellow ring" "two red triangles"

demo: install
	rm -rf $(DEMO_OUT)
	HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr distill --base tiny-sd3 --out $(DEMO_OUT)/distill
	HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr finetune-rl --from $(DEMO_OUT)/distill --rl refl --out $(DEMO_OUT)/distill-refl
	HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr sample $(DEMO_PROMPTS) --ckpt $(DEMO_OUT)/distill-refl --n 2 --grid --out $(DEMO_OUT)/student
	HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr sample $(DEMO_PROMPTS) --base tiny-sd3 --n 2 --grid --out $(DEMO_OUT)/teacher
	HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr eval --bench rewards --ckpt $(DEMO_OUT)/distill-refl --compare teacher \
		--prompts builtin:shapes --max-prompts 12 --reward color --out $(DEMO_OUT)/eval
	HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr export --ckpt $(DEMO_OUT)/distill-refl --format diffusers --out $(DEMO_OUT)/export
	@echo "demo done: report $(DEMO_OUT)/eval/report.md; runs $(DEMO_OUT)/distill, $(DEMO_OUT)/distill-refl; exported pipeline $(DEMO_OUT)/export"

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(DEMO_OUT) build dist *.egg-info
