# The README's first commands: `make demo` (the main job) and `make test` (the tests).
# Both create .venv with Python 3.10 when it is missing; a second run reinstalls nothing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXPORT_STAMP := $(VENV)/.installed-export
export DETECTRON2_DATASETS ?= $(CURDIR)/datasets

.PHONY: demo test venv clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	@test -x $(PY) || "$$(tools/find-python3.10)" -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# the optional export packages (onnx, onnxruntime) for the export tests; the main pins as constraints
$(EXPORT_STAMP): requirements-export.txt requirements.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-export.txt -c requirements.txt
	@touch $(EXPORT_STAMP)

test: $(STAMP) $(EXPORT_STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo/run_demo.py

clean-demo:
	rm -rf output/demo
