# The two commands of the README: `make demo` (the main job) and `make test`. Both install first.
PYTHON ?= python3

.PHONY: install demo test bench
install:
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	$(PYTHON) -m classfilters --model resnet20 --dataset digits --train-epochs 30 --k 5 --k-prime 5 --out out/digits-resnet20.json

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_influence.py
	$(PYTHON) benchmarks/bench_grid.py
