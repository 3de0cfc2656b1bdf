# keybroker: `make run` starts a development broker; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE_DIR ?= .keybroker
LISTEN ?= 127.0.0.1:50051
LINT_PATHS := src tests bench scripts deploy

.PHONY: run test lint proto demo bench bench-capacity bench-recording system-deps venv clean
.PHONY: fuzz check-grpcio-latest

## system-deps: install Debian packages the broker needs (SoftHSM2) when missing
system-deps:
	@scripts/ensure-system-deps.sh

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# checkov (tests/deploy) in a virtual environment of its own: it pins packaging<24, which the
# project's build (setuptools) needs newer.
CHECKOV := $(VENV)/tools/checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv $(VENV)/tools/checkov
	$(VENV)/tools/checkov/bin/pip install --quiet 'checkov>=3.2,<4'

## venv: create .venv with keybroker and its development tools
venv: $(BIN)/.installed $(CHECKOV)

## run: provision the embedded dev environment under $(STATE_DIR) and start the broker
run: system-deps venv
	$(BIN)/keybroker dev init --state-dir $(STATE_DIR) --listen $(LISTEN)
	$(BIN)/keybroker serve --config $(STATE_DIR)/keybroker.toml

## test: lint, type-check and run every test (real SoftHSM, real mTLS, real PostgreSQL); then the
## server tests once more on the grpc engine ([server] engine, docs/CONCURRENCY.md#engines)
test: venv lint
	@scripts/ensure-system-deps.sh --test
	env -u KEYBROKER_SERVER_ENGINE $(BIN)/pytest
	KEYBROKER_SERVER_ENGINE=grpc $(BIN)/pytest tests/server

## check-grpcio-latest: the server tests (loop engine) on the newest grpcio release, in a scratch
## virtual environment; see docs/OPERATIONS.md#upgrading-grpcio
GRPCIO_LATEST := .venv-grpcio-latest
check-grpcio-latest: system-deps
	$(PYTHON) -m venv $(GRPCIO_LATEST)
	$(GRPCIO_LATEST)/bin/pip install --quiet --upgrade pip
	$(GRPCIO_LATEST)/bin/pip install --quiet -e '.[dev]'
	@# over the pin on purpose: pip warns that keybroker requires an older grpcio
	$(GRPCIO_LATEST)/bin/pip install --quiet --upgrade grpcio grpcio-health-checking grpcio-reflection
	@scripts/ensure-system-deps.sh --test
	@$(GRPCIO_LATEST)/bin/python -c 'import grpc; print("check-grpcio-latest: grpcio", grpc.__version__)'
	env -u KEYBROKER_SERVER_ENGINE $(GRPCIO_LATEST)/bin/pytest tests/server
	@$(GRPCIO_LATEST)/bin/python -c 'import grpc; print("check-grpcio-latest: the server tests pass on grpcio", grpc.__version__, "with the loop engine")'

lint: venv
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy

## proto: regenerate src/keybroker/v1 from proto/ (never edit generated code)
proto: venv
	$(BIN)/python scripts/gen_proto.py

## demo: encrypt, decrypt and be refused, against the broker `make run` started
demo: venv
	$(BIN)/python scripts/demo.py --state-dir $(STATE_DIR)

## bench: the side-by-side benchmark (see docs/PERFORMANCE.md)
bench: system-deps venv
	$(BIN)/python bench/run.py

## bench-capacity: throughput against calls in flight, 16..256 (see docs/PERFORMANCE.md)
bench-capacity: system-deps venv
	$(BIN)/python bench/capacity.py

## bench-recording: recording format memory (2 GiB round trip) and throughput vs raw AES-GCM
bench-recording: venv
	$(BIN)/python bench/recording.py --size-gib 2

## fuzz: the long fuzzing campaign, one niced process at a time (figures in .fuzz/summary.md)
fuzz: system-deps venv
	nice -n 10 $(BIN)/python -m tests.fuzz.campaign --out .fuzz

clean:
	rm -rf $(VENV) $(GRPCIO_LATEST) .mypy_cache .ruff_cache .pytest_cache .hypothesis
