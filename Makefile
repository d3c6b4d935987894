# medvlm: build, run and test. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= tiny
WEIGHTS ?=
BUNDLES ?= bundles
PROTOS := $(wildcard protos/medvlm/v1/*.proto)
export PYTHONPATH := $(CURDIR):$(CURDIR)/gen
export HF_HUB_OFFLINE := 1

.PHONY: help venv protos lint-protos bundle run test smoke clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

venv: $(VENV)/.installed  ## create the virtual environment (pinned requirements)

$(VENV)/.installed: requirements/serve.txt requirements/build.txt requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt -c requirements/constraints.txt
	touch $@

protos: gen/.stamp  ## generate Python code and .pyi stubs from protos/ into gen/

gen/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=gen --pyi_out=gen --grpc_python_out=gen \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=gen $(PROTOS)
	touch $@

lint-protos: $(VENV)/.installed  ## buf lint the contracts
	$(VENV)/bin/buf lint protos

bundle: $(VENV)/.installed  ## build bundles/MODEL (MODEL=tiny|demo|biomedclip-arch|biomedclip [WEIGHTS=dir])
	$(PY) -m engines.build --model $(MODEL) --out $(BUNDLES) $(if $(WEIGHTS),--weights $(WEIGHTS))

run: protos  ## start the local stack (vision, text, gateway) on the default bundle, offline
	$(PY) -m services.launch --model $(MODEL) --bundles $(BUNDLES)

test: protos  ## run the test suite
	$(PY) -m pytest -q

TARGET ?= 127.0.0.1:50050

smoke: $(VENV)/.installed  ## smoke-test a running gateway through reflection (TARGET=host:port, default 127.0.0.1:50050)
	bash scripts/smoke.sh $(TARGET)

clean:  ## remove generated code and built bundles
	rm -rf gen $(BUNDLES)
