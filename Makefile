# The two commands of the README: `make up` (a local cluster and a demo completion)
# and `make test` (the whole suite). Both set up whatever is missing first.
.PHONY: setup up test bench-kv bench-compare protos

setup:
	@scripts/setup.sh

up: setup
	.venv/bin/tandem up $(ARGS)

test: setup
	.venv/bin/python -m pytest -ra --durations=25 $(ARGS)

bench-kv: setup
	.venv/bin/python -m tandem.bench.kv_transfer $(ARGS)

bench-compare: setup
	.venv/bin/tandem bench compare $(ARGS)

protos: setup
	.venv/bin/python -m tandem.protogen
