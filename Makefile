# Two commands: `make demo` (set up .venv/ and run the quickstart audit) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
STAMP := $(VENV)/.installed
AUDIT_DIR ?= audits/quickstart

.PHONY: install demo test test-slow lint bench clean browser findings docs

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the CPU build; every later call is constrained to it.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[all,dev,docs]'
	@if $(BIN)/pip show torchvision >/dev/null 2>&1; then $(PIP) uninstall -y -q torchvision; fi
	touch $(STAMP)

install: $(STAMP)

browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

demo: $(STAMP)
	$(BIN)/stabilitybench audit examples/quickstart.yaml --out $(AUDIT_DIR)

# The paper-scale audits (examples/paper_*.yaml; hours of CPU, resumable: rerun to continue;
# paper_lm_collapse: paper_lm with a ramp strong enough to collapse GPT-2; paper_lm_doses: that
# ramp at x300 and x1000, the hard negatives of the warning protocol; lm_buildup: the tiny GPT-2's
# build-ups; paper_rl_td3, paper_rl_sac and paper_rl_ppo: TD3, SAC and PPO at budgets where they
# have learned before onset; paper_lm_intrinsic: the sweep for a GPT-2 that diverges on its own;
# paper_lm_intrinsic_judged: its edge as recipes on trial, then paper_lm_intrinsic_guards: guards
# on those recipes' own divergences), then their findings
# folders under results/ (summary, evaluation, report, spec, versions); after paper_rl,
# paper_lm_collapse and lm_buildup, the guard audit on that audit's ramp
# (examples/paper_rl_guards.yaml, paper_lm_guards.yaml and paper_lm_ramp_guards.yaml,
# lm_buildup_guards.yaml: the msm guard reads the audit's fitted monitor).
FINDINGS ?= paper_rl paper_rl_td3 paper_rl_sac paper_rl_ppo paper_lm paper_lm_collapse paper_lm_doses paper_lm_intrinsic paper_lm_intrinsic_edge paper_lm_intrinsic_judged lm_buildup
GUARDS_paper_rl = paper_rl_guards
GUARDS_paper_lm_collapse = paper_lm_guards paper_lm_ramp_guards
GUARDS_lm_buildup = lm_buildup_guards
GUARDS_paper_lm_intrinsic_judged = paper_lm_intrinsic_guards
findings: $(STAMP)
	@for a in $(FINDINGS); do \
	  case $$a in paper_rl) g="$(GUARDS_paper_rl)";; \
	    paper_lm_collapse) g="$(GUARDS_paper_lm_collapse)";; \
	    lm_buildup) g="$(GUARDS_lm_buildup)";; \
	    paper_lm_intrinsic_judged) g="$(GUARDS_paper_lm_intrinsic_judged)";; *) g=;; esac; \
	  for b in $$a $$g; do \
	    if [ "$$b" != "$$a" ]; then r=--no-report; else r=; fi; \
	    $(BIN)/stabilitybench audit examples/$$b.yaml --out audits/$$b $$r && \
	    $(BIN)/stabilitybench export audits/$$b --out results/$$b && \
	    $(BIN)/stabilitybench findings results/$$b || exit 2; \
	  done; \
	done

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow" --timeout=900

# The long end-to-end tests `make test` skips (a two-node Ray cluster, overlapping audits); CI
# runs them as a separate step.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout=900

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The documentation site (mkdocs-material) into site/; --strict: a broken link fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict -d site

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) audits
