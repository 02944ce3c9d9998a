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

.PHONY: install demo test paper-mini clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

DEMO_PROMPTS := "a photo of a 3" "a photo of a red 7" "a photo of two 5s" "a photo of a 2 left of an 8"
DMDR := HF_HUB_OFFLINE=1 $(VENV)/bin/dmdr

# The whole workflow on the shipped digits-world teacher (tiny-sd3): distil a 4-step student, RL-finetune it with
# the digit-classifier reward, sample student and teacher, evaluate all three side by side (GenEval-digits,
# digits-FID, reward, seconds per image) and export the student as a diffusers pipeline.
demo: install
	rm -rf $(DEMO_OUT)
	$(DMDR) distill --base tiny-sd3 --steps 4 --out $(DEMO_OUT)/distill
	$(DMDR) finetune-rl --from $(DEMO_OUT)/distill --rl refl --out $(DEMO_OUT)/distill-refl
	$(DMDR) sample $(DEMO_PROMPTS) --ckpt $(DEMO_OUT)/distill-refl --n 4 --grid --out $(DEMO_OUT)/student
	$(DMDR) sample $(DEMO_PROMPTS) --base tiny-sd3 --n 4 --grid --out $(DEMO_OUT)/teacher
	$(DMDR) eval --bench digits --ckpt $(DEMO_OUT)/distill-refl --compare teacher --compare $(DEMO_OUT)/distill \
		--out $(DEMO_OUT)/eval
	$(DMDR) export --ckpt $(DEMO_OUT)/distill-refl --format diffusers --out $(DEMO_OUT)/export
	@echo "demo done: report $(DEMO_OUT)/eval/report.md (teacher vs student before/after RL); runs $(DEMO_OUT)/distill, $(DEMO_OUT)/distill-refl; exported pipeline $(DEMO_OUT)/export"

# The DMDR paper's ablations in miniature on the digits world (about 9 minutes here; not part of CI). Tables, curves
# and sample rows go to docs/results/ (commit them); work folders to docs/results/work/ (ignored).
paper-mini: install
	HF_HUB_OFFLINE=1 $(PY) scripts/paper_mini.py --out docs/results

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) $(DEMO_OUT) build dist *.egg-info
