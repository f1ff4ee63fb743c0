#!/usr/bin/env bash
# The README's main job (Wanda, 75 %, MSP) and the same with SparseGPT, timed from cold caches at 2 threads.
# Run it with nothing else on the machine. Each method gets a fresh OPTIMUM_MSP_CACHE holding only the converted
# model, so the Fisher traces and search statistics are computed, not read. Output: bench/results/quiet_<method>.json
# (the command's summary), .err (logs, with the search's timings), and one wall-time line per method in
# bench/results/quiet_timing.log; the plan with its search timings is in /tmp/quiet-out-<method>/config.json.
# PRESET=quality: the same with --preset quality (files and folders named <method>-quality).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
python -c "import optimum_msp.modeling.loading as l; l.resolve_model_path('smollm2-135m')"  # convert once, untimed
models="${OPTIMUM_MSP_CACHE:-$HOME/.cache/optimum_msp}/models"
for method in ${METHODS:-wanda sparsegpt}; do  # METHODS=sparsegpt: one half only
  name="$method${PRESET:+-$PRESET}"
  cache="/tmp/quiet-cache-$name"
  rm -rf "$cache" "/tmp/quiet-out-$name" && mkdir -p "$cache" && ln -s "$models" "$cache/models"
  start=$(date +%s)
  OPTIMUM_MSP_CACHE="$cache" optimum-msp prune smollm2-135m --method "$method" --sparsity 0.75 --allocation msp \
      ${PRESET:+--preset "$PRESET"} --output "/tmp/quiet-out-$name" --eval-windows 16 --threads 2 \
      > "bench/results/quiet_$name.json" 2> "bench/results/quiet_$name.err"
  echo "$name exit $? wall $(( $(date +%s) - start )) s" | tee -a bench/results/quiet_timing.log
done
