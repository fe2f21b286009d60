# hpcray — every target works from a fresh clone: `make demo` (main job, local Ray + MLflow), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= local
JOB ?= training
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test vega-box render doctor up submit down run status pull sif docs wheel bench bench-gpu clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/hpcray: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# helm for users: beside the venv's python when none is on PATH. Tests use both majors from .tools/.
$(BIN)/helm: | $(BIN)/hpcray
	@if command -v helm >/dev/null 2>&1; then ln -sf "$$(command -v helm)" $@; \
	 else $(BIN)/python tools/get_helm.py .tools/helm3 3 && ln -sf "$$PWD/.tools/helm3/helm" $@; fi

.tools/helm3/helm .tools/helm4/helm: | $(BIN)/hpcray
	$(BIN)/python tools/get_helm.py $(@D) $(subst helm,,$(notdir $(@D)))

install: $(BIN)/hpcray $(BIN)/helm  ## create .venv with hpcray and its dependencies, and a real helm

demo: install  ## the main job: local Ray + MLflow, training then HPO, everything torn down
	$(BIN)/hpcray run --profile local training hpo

test: install .tools/helm3/helm .tools/helm4/helm  ## the test suite (real Ray, MLflow, helm 3+4, SLURM where installed)
	HPCRAY_HELM3=$$PWD/.tools/helm3/helm HPCRAY_HELM4=$$PWD/.tools/helm4/helm $(BIN)/python -m pytest $(PYTEST_ARGS)

vega-box: install .tools/helm3/helm  ## the Vega flow on the site in a box (interLink over real SLURM; root): pull, up, training + HPO, down, where the MLflow password landed
	HPCRAY_HELM=$$PWD/.tools/helm3/helm $(BIN)/python -m tests.vega_box $(VEGA_BOX_ARGS)

render: install  ## print the Helm values of PROFILE
	$(BIN)/hpcray render --profile $(PROFILE)

doctor: install  ## every check hpcray can make for PROFILE before HPC hours are spent
	$(BIN)/hpcray doctor --profile $(PROFILE)

up: install  ## bring up PROFILE's cluster
	$(BIN)/hpcray up --profile $(PROFILE)

submit: install  ## submit JOB to PROFILE's cluster and follow it
	$(BIN)/hpcray submit --profile $(PROFILE) $(JOB)

down: install  ## tear down PROFILE's cluster
	$(BIN)/hpcray down --profile $(PROFILE)

run: install  ## up → JOB → down for PROFILE
	$(BIN)/hpcray run --profile $(PROFILE) $(JOB)

status: install  ## clusters made by hpcray
	$(BIN)/hpcray status --all

pull: install  ## pull PROFILE's SIF image on the SLURM side
	$(BIN)/hpcray pull --profile $(PROFILE) --slurm

SIF ?= build/ray.sif
SIF_BUILD_FLAGS ?= --fakeroot
sif:  ## build the Ray image SIF (containers/ray.def) where apptainer or singularity exists
	@runtime=$$(command -v apptainer || command -v singularity) || { echo 'make sif: neither apptainer nor singularity is installed here; build on a machine with one (an HPC login node), or pull a published image with `hpcray pull --slurm`' >&2; exit 1; }; \
	 mkdir -p $(dir $(SIF)) && set -x && "$$runtime" build $(SIF_BUILD_FLAGS) $(SIF) containers/ray.def

docs: install  ## regenerate docs/profile.md (profile schema) and docs/RELIABILITY.md (reliability tests)
	$(BIN)/hpcray profile --schema > docs/profile.md
	$(BIN)/python tools/reliability_table.py

wheel: install  ## build dist/hpcray-*.whl (profiles, template and examples inside) to pip/pipx install elsewhere
	$(BIN)/pip wheel --no-deps -w dist .

bench: install .tools/helm4/helm  ## hpcray vs the usual tools, side by side, into docs/BENCHMARKS.md (~30 min)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

bench-gpu: install  ## GPU proof: training bare vs via `hpcray submit --num-gpus 1` (NVIDIA GPU + torch)
	$(BIN)/python bench/gpu_proof.py

clean:  ## remove the venv, downloaded tools and built wheels
	rm -rf $(VENV) .tools build dist
