# The two commands of the README: `make demo` (the main job) and `make test`. Both install first.
PYTHON ?= python3

# `make demo PROFILE=cifar10` runs another profile (profiles/*.yaml)
PROFILE ?= demo

.PHONY: install demo lab test bench bench-gpu mutate
install:
	$(PYTHON) -m pip install -q -e ".[dev]"

# every notebook in order for $(PROFILE): tables and figures in figures/$(PROFILE)/, executed notebooks in runs/
demo: install
	$(PYTHON) -m classfilters.runner --profile $(PROFILE)

# JupyterLab on the notebooks, with the k / k' widget panel working
lab:
	$(PYTHON) -m pip install -q -e ".[notebooks]"
	$(PYTHON) -m jupyter lab notebooks/

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_influence.py
	$(PYTHON) benchmarks/bench_grid.py
	$(PYTHON) benchmarks/bench_decode.py
	$(PYTHON) benchmarks/bench_scaleout.py --device cpu
	$(PYTHON) benchmarks/bench_explain.py
	$(PYTHON) benchmarks/bench_memory.py
	$(PYTHON) benchmarks/bench_train.py --device cpu --no-compile --epochs 1 --baseline-epochs 1 --train-images 5120 --keep-freed-memory --repeat 3 --recipe precision=fp32

# the GPU benchmarks (needs CUDA and ../shared/data): Algorithm 1, decoding, the depth study's
# one-pass extraction, training ResNet-20 (results in benchmarks/results/*-cuda.json)
bench-gpu: install
	$(PYTHON) benchmarks/bench_influence.py --device cuda --loop-rows 100000
	$(PYTHON) benchmarks/bench_decode.py --device cuda
	$(PYTHON) benchmarks/bench_study.py --device cuda
	$(PYTHON) benchmarks/bench_train.py --device cuda

# mutation testing of the paper's logic (mutmut 3; an hour or more on 2 cores, not in CI):
# the score per module and the surviving mutants in benchmarks/results/mutation.json
mutate: install
	$(PYTHON) -m pip install -q "mutmut>=3.8,<4"
	$(PYTHON) benchmarks/mutate.py
