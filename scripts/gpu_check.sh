#!/usr/bin/env bash
# The GPU check (README "Performance"): the benchmark in bf16 at the LLaVA-OV-0.5B shapes, the whole 0.5B
# architecture from config with LiME (random weights, nothing downloaded), bitsandbytes 8-bit and 4-bit bases,
# fused AdamW; one JSON file. Under 5 minutes on one GPU.
#
#   bash scripts/gpu_check.sh [--output gpu_check.json]
#   bash scripts/gpu_check.sh --dry-run      # the same steps on the CPU at tiny sizes (bitsandbytes skipped)
#
# PYTHON selects the interpreter (default: python). Exit status 1 when a step failed (the JSON says which).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
