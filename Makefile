# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: demo test test-slurm lint report clean

$(BIN)/activate: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# One pip line for everything, so that torch and torchvision stay a matched pair.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(BIN)/activate

demo: $(BIN)/activate
	$(BIN)/snakemake --cores $(CORES)
	@cat results/metrics_table.md

lint: $(BIN)/activate
	$(BIN)/snakefmt --check .
	$(BIN)/snakemake --lint

test: lint
	$(BIN)/python -m pytest -q -ra

test-slurm: $(BIN)/activate
	bash .ci/slurm/start.sh
	CXRFLOW_SLURM=1 $(BIN)/python -m pytest -q -ra tests/slurm_check.py; status=$$?; bash .ci/slurm/stop.sh; exit $$status

report: $(BIN)/activate
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

clean:
	rm -rf results .snakemake resources/synthetic
