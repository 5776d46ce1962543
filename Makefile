# Two commands: `make demo` (set up .venv/ and run the quickstart audit) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
STAMP := $(VENV)/.installed
AUDIT_DIR ?= audits/quickstart

.PHONY: install demo test lint bench clean browser findings

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the CPU build; every later call is constrained to it.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[all,dev]'
	@if $(BIN)/pip show torchvision >/dev/null 2>&1; then $(PIP) uninstall -y -q torchvision; fi
	touch $(STAMP)

install: $(STAMP)

browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

demo: $(STAMP)
	$(BIN)/stabilitybench audit examples/quickstart.yaml --out $(AUDIT_DIR)

# The paper-scale audits (examples/paper_*.yaml; hours of CPU, resumable: rerun to continue;
# paper_lm_collapse: paper_lm with a ramp strong enough to collapse GPT-2),
# then their findings folders under results/ (summary, evaluation, report, spec, versions),
# then the guard audits on paper_rl's PPO ramp and paper_lm_collapse's GPT-2 ramp
# (examples/paper_rl_guards.yaml, examples/paper_lm_guards.yaml).
FINDINGS ?= paper_rl paper_lm paper_lm_collapse
HORIZON_paper_rl = 1000
HORIZON_paper_lm = 100
findings: $(STAMP)
	@for a in $(FINDINGS); do \
	  $(BIN)/stabilitybench audit examples/$$a.yaml --out audits/$$a && \
	  $(BIN)/stabilitybench export audits/$$a --out results/$$a \
	    --horizon $$(case $$a in paper_rl) echo $(HORIZON_paper_rl);; *) echo $(HORIZON_paper_lm);; esac) && \
	  $(BIN)/stabilitybench findings results/$$a || exit 2; \
	done
	@# What a guard saves on the paper audit's PPO ramp (its msm guard reads audits/paper_rl's monitor).
	@if echo " $(FINDINGS) " | grep -q " paper_rl "; then \
	  $(BIN)/stabilitybench audit examples/paper_rl_guards.yaml --out audits/paper_rl_guards --no-report && \
	  $(BIN)/stabilitybench export audits/paper_rl_guards --out results/paper_rl_guards --horizon $(HORIZON_paper_rl) && \
	  $(BIN)/stabilitybench findings results/paper_rl_guards || exit 2; \
	fi
	@# ... and on paper_lm_collapse's GPT-2 ramp (its msm guard reads that audit's monitor).
	@if echo " $(FINDINGS) " | grep -q " paper_lm_collapse "; then \
	  $(BIN)/stabilitybench audit examples/paper_lm_guards.yaml --out audits/paper_lm_guards --no-report && \
	  $(BIN)/stabilitybench export audits/paper_lm_guards --out results/paper_lm_guards --horizon $(HORIZON_paper_lm) && \
	  $(BIN)/stabilitybench findings results/paper_lm_guards || exit 2; \
	fi

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow" --timeout=900

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) audits
