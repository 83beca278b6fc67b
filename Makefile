# The two commands of the quick start (`make demo`, `make test`) build their own
# virtual environment, so they work on a fresh machine with only python3 on it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,confluent]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m streamem.precompile
	$(PY) -m streamem demo

# Two pytest workers: the Kafka tests mostly wait on the broker, so two run side by side on two
# cores (520 tests: 6 min 37 s against 11 min 40 s in one worker); each worker starts its own broker.
test: $(STAMP)
	$(PY) -m ruff check streamem connectors tests benchmarks
	$(PY) -m streamem.precompile  # numba's first compile (~12 s) once, before the tests' deadlines start
	$(PY) -m pytest -n 2

lint: $(STAMP)
	$(PY) -m ruff check streamem connectors tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/batch.py
	$(PY) benchmarks/hmm.py
	$(PY) benchmarks/markov_switching.py
	$(PY) benchmarks/online_hmm.py
	$(PY) benchmarks/online.py
	$(PY) benchmarks/kafka_pipeline.py
	$(PY) benchmarks/kafka_regimes.py
	$(PY) benchmarks/kafka_latency.py
	$(PY) benchmarks/drift.py
	$(PY) benchmarks/outliers.py
	$(PY) benchmarks/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
