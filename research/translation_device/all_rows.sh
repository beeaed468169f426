#!/bin/bash
# Every row of `calm reproduce translation` for seeds 0-2, each row its own process, side by side on one GPU
# (how results/translation/test_recipe2 was made; 16 processes took 7.6 min on an NVIDIA H200):
#     bash research/translation_device/all_rows.sh PROSE.json OUT_DIR
# then, on any machine: calm reproduce translation --summarize OUT_DIR/untrained OUT_DIR/seed*_*/ --output-dir DIR
PROSE=$1 OUT=$2
HERE=$(dirname "$0")
mkdir -p "$OUT"
row() {  # seed name rows...
  local seed=$1 name=$2; shift 2
  python3 "$HERE/run.py" run "$PROSE" -- --seed "$seed" --device cuda --threads 1 --output-dir "$OUT/$name" \
    --rows "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"
}
row 0 untrained "m_B, zero-shot" "m_B, few-shot" "m_A, few-shot" &
for seed in 0 1 2; do
  for r in "CALM" "m_B + LoRA" "m_B fine-tuned" "CALM, m_A on prompt only" "CALM, random m_A"; do
    row "$seed" "seed${seed}_$(echo "$r" | tr -c 'A-Za-z0-9\n' '_' | tr 'A-Z' 'a-z')" "$r" &
  done
done
wait
