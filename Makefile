# medvlm: build, run and test. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= demo
WEIGHTS ?=
BUNDLES ?= bundles
PROTOS := $(wildcard protos/medvlm/v1/*.proto)
WHEELHOUSE := .cache/wheelhouse
export PYTHONPATH := $(CURDIR):$(CURDIR)/gen
export HF_HUB_OFFLINE := 1

.PHONY: help venv checkov protos lint-protos proto-baseline bundle quantize quantize-openvino calibrate run test test-quick test-engine mutate smoke bench bench-compare bench-labelsets gpu-check gpu-wheels soak faults fuzz clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv: $(VENV)/.installed $(VENV)/.medvlm-installed  ## create the virtual environment (pinned requirements) and the medvlm command

$(VENV)/.installed: requirements/serve.txt requirements/build.txt requirements/client.txt requirements/web.txt requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt -c requirements/constraints.txt
	touch $@

protos: gen/.stamp  ## generate Python code and .pyi stubs from protos/ into gen/

# Generated into a fresh folder and swapped in, so a running process never sees gen/ half-written.
gen/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf gen.new && mkdir -p gen.new
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen.new --pyi_out=gen.new --grpc_python_out=gen.new \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=gen.new $(PROTOS)
	touch gen.new/.stamp
	rm -rf gen && mv gen.new gen

# The project itself, editable: the client (medvlm.client), the generated contracts (medvlm.v1,
# mapped to gen/medvlm/v1, so it needs gen/ first) and the `medvlm` command in $(VENV)/bin.
$(VENV)/.medvlm-installed: pyproject.toml gen/.stamp
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The contract as last released, as a buf image committed in the repository (so the check needs no
# git history): every change must be additive against it. Refresh it when a release ships.
PROTO_BASELINE := protos/baseline/medvlm-v1.binpb

lint-protos: $(VENV)/.installed  ## buf lint the contracts, and buf breaking against the released contract
	$(VENV)/bin/buf lint protos
	$(VENV)/bin/buf breaking protos --against $(PROTO_BASELINE)

proto-baseline: $(VENV)/.installed  ## record the current contracts as the released baseline of buf breaking
	$(VENV)/bin/buf build protos -o $(PROTO_BASELINE)

bundle: $(VENV)/.installed  ## build bundles/MODEL (MODEL=tiny|demo|biomedclip-arch|biomedclip [WEIGHTS=dir] [PRECISION=int8|fp16|int8,fp16] [CALIBRATION=dir] [SIGN_KEY=release.key: sign it])
	$(PY) -m engines.build --model $(MODEL) --out $(BUNDLES) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(PRECISION),--precision $(PRECISION)) $(if $(CALIBRATION),--calibration $(CALIBRATION)) $(if $(SIGN_KEY),--sign-key $(SIGN_KEY))

quantize: $(VENV)/.installed  ## add gated int8/fp16 engines to a built bundle (BUNDLE=bundles/NAME [PRECISION=int8] [CALIBRATION=dir])
	$(PY) -m engines.build quantize --bundle $(BUNDLE) $(if $(PRECISION),--precision $(PRECISION)) $(if $(CALIBRATION),--calibration $(CALIBRATION))

quantize-openvino: $(VENV)/.installed  ## add gated NNCF int8 engines for OpenVINO to a built bundle (BUNDLE=bundles/NAME [CALIBRATION=dir])
	$(PY) -m engines.build openvino --bundle $(BUNDLE) $(if $(CALIBRATION),--calibration $(CALIBRATION))

calibrate: $(VENV)/.installed  ## fit temperature, out-of-distribution statistics and abstention thresholds into BUNDLE/calibration.json (BUNDLE=bundles/NAME [CALIBRATION=dir of label subfolders])
	$(PY) -m engines.build calibrate --bundle $(or $(BUNDLE),$(BUNDLES)/demo-synthetic-1) $(if $(CALIBRATION),--calibration $(CALIBRATION))

run: protos $(VENV)/.medvlm-installed  ## start the local stack (vision, text, gateway, web page on :8050) on the default bundle, offline; TLS=1: local CA, TLS, mTLS, auth
	$(PY) -m devtools.launch --model $(MODEL) --bundles $(BUNDLES) $(if $(TLS),--tls)

# Parallel workers (pytest-xdist), one per CPU unless TEST_WORKERS says otherwise (TEST_WORKERS=0: one
# process). A file's tests stay on one worker, so a server its module shares starts once; every
# worker has its own bundles and data directories (tmp_path_factory) and the same random-order seed.
TEST_WORKERS ?= auto
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile

test: protos $(VENV)/.medvlm-installed $(VENV)/bin/checkov $(WHEELHOUSE)/.downloaded  ## run the test suite in a random order on parallel workers (pytest-randomly prints the seed; --randomly-seed=N repeats an order)
	$(PY) -m pytest -q --durations=10 $(PYTEST_PARALLEL)

# The inner loop while coding: unit and contract tests with in-process servers; no browser, no
# soak or load, no spawned stacks, no manifest scan, no bundle builds beyond tiny and demo.
QUICK_TESTS ?= tests/test_imports.py tests/test_settings.py tests/test_batching.py tests/test_contracts.py \
	tests/test_gateway.py tests/test_scoring.py tests/test_stream.py tests/test_trust.py tests/test_preprocess.py \
	tests/test_dicom.py tests/test_windowing.py tests/test_text_tokenizer.py tests/test_derived.py \
	tests/test_dockerfiles.py tests/test_fuzz.py tests/test_client.py

test-quick: protos $(VENV)/.medvlm-installed  ## unit and contract tests only (no browser, soak, load or manifests): under 2 minutes on 2 cores
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow" $(QUICK_TESTS)

# Wheels for tests/test_wheel.py, which installs the project's wheel into a new virtual environment
# offline (pip --no-index): the imaging extra of pyproject.toml and the page's requirements, at the
# pins of constraints.txt, fetched once here.
$(WHEELHOUSE)/.downloaded: pyproject.toml requirements/web.txt requirements/client.txt requirements/constraints.txt $(VENV)/.installed
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["imaging"], sep="\n")' > $(WHEELHOUSE)/imaging.txt
	$(PY) -m pip download -q --only-binary=:all: -d $(WHEELHOUSE) -c requirements/constraints.txt \
		-r $(WHEELHOUSE)/imaging.txt -r requirements/web.txt
	touch $@

# checkov, for the scan of the rendered manifests (tests/test_k8s_operations.py), in a virtual
# environment of its own (its pins would fight the serving ones), linked into $(VENV)/bin.
CHECKOV_VENV := .cache/checkov

checkov: $(VENV)/bin/checkov  ## install checkov (requirements/checkov.txt) into .cache/checkov, linked as $(VENV)/bin/checkov

$(VENV)/bin/checkov: requirements/checkov.txt $(VENV)/.installed
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q -r requirements/checkov.txt
	ln -sf $(CURDIR)/$(CHECKOV_VENV)/bin/checkov $@

ENGINE ?=
# The test files that start stacks (in process or as processes), for test-engine.
ENGINE_TESTS ?= $(shell grep -l 'start_stack\|start_server\|spawn_service\|tiny_stack\|devtools.launch' tests/test_*.py)

test-engine: protos $(VENV)/.medvlm-installed  ## the tests that start stacks, every stack's engine forced to ENGINE (default openvino) unless a test pins its own
	MEDVLM_TEST_ENGINE=$(or $(ENGINE),openvino) $(PY) -m pytest -q $(PYTEST_PARALLEL) $(ENGINE_TESTS)

mutate: protos  ## break the serving path on purpose, one named mutation at a time, and report which the tests miss (about 10 min; not in CI)
	$(PY) scripts/mutate.py $(MUTATIONS)

BENCH_TRITON ?= .cache/bench-triton
BENCH_ARGS ?=

bench: protos $(VENV)/.bench-installed $(BENCH_TRITON)/.installed  ## benchmark vs torch, ONNX Runtime and Triton into bench/results (about 70 min); BENCH_ARGS=--quick: 1 min
	$(PY) -m bench --triton-python $(BENCH_TRITON)/bin/python $(BENCH_ARGS)

OLD ?= HEAD~1
bench-compare: protos $(VENV)/.bench-installed  ## the vision encoder and gateway of commit OLD (default HEAD~1) beside this checkout's, alternating, on demo and biomedclip-arch
	$(PY) -m bench.compare --old $(OLD) $(COMPARE_ARGS)

MINUTES ?= 10
LEAK ?=

soak: protos $(VENV)/.bench-installed  ## the local stack under mixed load for MINUTES (10); fails on memory/fd/thread growth; LEAK=1 must fail
	$(PY) -m bench.soak --minutes $(MINUTES) $(if $(LEAK),--leak)

faults: protos $(VENV)/.bench-installed  ## fault matrix under load with real processes (kills, freezes, floods, SIGTERM); about 2-5 min; ENGINE=openvino: every encoder's engine
	$(PY) -m bench.faults $(if $(ENGINE),--engine $(ENGINE))

fuzz: protos $(VENV)/.bench-installed  ## coverage-guided fuzzing (atheris) of decoders, text path and gateway requests, MINUTES in all
	$(PY) -m bench.fuzz --minutes $(MINUTES)

$(VENV)/.bench-installed: requirements/bench.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements/bench.txt -c requirements/constraints.txt
	touch $@

# Triton's own environment (it needs numpy<2 and protobuf<7). If it cannot be made, the
# benchmark says why and runs the other systems, so a failure here does not stop make.
$(BENCH_TRITON)/.installed: bench/requirements-triton.txt
	-test -x $(BENCH_TRITON)/bin/python || $(PYTHON) -m venv $(BENCH_TRITON)
	-$(BENCH_TRITON)/bin/python -m pip install -q -r bench/requirements-triton.txt && touch $@

bench-labelsets: protos  ## label set figures: p50 5,000 vs 10 labels, memory with 50,000, accuracy with ensembles, exact vs HNSW search (a few minutes)
	test -n "$$(ls -d $(BUNDLES)/demo-*/ 2>/dev/null)" || $(PY) -m engines.build --model demo --out $(BUNDLES)
	$(PY) -m bench.labelsets

GPU_CHECK_ARGS ?=
GPU_PYTHON ?= $(PY)
GPU_WHEELS := .cache/gpu-wheels

# On the GPU machine: GPU_PYTHON=python3 (its PyTorch), gen/ carried along (make protos here), the
# wheels of `make gpu-wheels` installed. Bounded by the script (8 min) and, as a last resort, here.
gpu-check:  ## one-shot GPU check (at most 8 min): torch CUDA fp32/fp16, served Classify, TensorRT plans where it imports; report in bench/out/gpu-check (GPU_CHECK_ARGS=--device cpu: a labelled CPU dry run)
	test -f gen/.stamp || { echo "gen/ is missing: run make protos where the venv exists and carry gen/ along"; exit 1; }
	timeout 560 $(GPU_PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

gpu-wheels: $(VENV)/.installed  ## wheels gpu-check needs beyond PyTorch (requirements/gpu-check.txt) into .cache/gpu-wheels, at most 60 MiB
	rm -rf $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any -d $(GPU_WHEELS) -r requirements/gpu-check.txt
	@total=$$(cat $(GPU_WHEELS)/*.whl | wc -c); echo "$$(ls $(GPU_WHEELS) | wc -l) wheels, $$((total / 1048576)) MiB"; \
		test $$total -le 62914560 || { echo "over 60 MiB"; exit 1; }

TARGET ?= 127.0.0.1:50050

smoke: $(VENV)/.installed  ## smoke-test a running gateway through reflection (TARGET=host:port, default 127.0.0.1:50050)
	bash scripts/smoke.sh $(TARGET)

clean:  ## remove generated code and built bundles
	rm -rf gen $(BUNDLES)
