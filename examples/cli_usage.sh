#!/usr/bin/env bash
# The diffusers-sdnq command line on a tiny pipeline, fully offline:
#   quantize a dense folder -> inspect it -> verify it -> dequantize it back to a plain folder,
#   then damage a copy and watch `verify` catch it.
#
#     bash examples/cli_usage.sh [WORK_DIR]
#
# On a real checkpoint the commands are the same, e.g.
#     hf download Disty0/FLUX.2-klein-4B-SDNQ-4bit-dynamic --local-dir klein   # needs the network
#     diffusers-sdnq inspect klein
# Every command has --help; docs/cli.md describes them all.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
work="${1:-$(mktemp -d "${TMPDIR:-/tmp}/sdnq-cli-XXXXXX")}"
export HF_HUB_OFFLINE=1

# `diffusers-sdnq` is installed by `pip install -e .`; `python -m diffusers_sdnq` is the same program.
if command -v diffusers-sdnq >/dev/null 2>&1; then
    sdnq() { diffusers-sdnq "$@"; }
else
    sdnq() { "$python" -m diffusers_sdnq "$@"; }
fi

step() { printf '\n$ %s\n' "$*"; }

# A tiny dense FLUX.2-Klein-shaped pipeline with random weights (the test suite's offline builder).
"$python" -c 'import sys; sys.path.insert(0, sys.argv[1]); from tiny_models import build_flux2_klein; build_flux2_klein(sys.argv[2])' \
    "$here/../tests" "$work/dense"

step diffusers-sdnq quantize dense uint4 --weights-dtype uint4
sdnq quantize "$work/dense" "$work/uint4" --weights-dtype uint4 --no-progress

step diffusers-sdnq inspect uint4
sdnq inspect "$work/uint4"   # add --layers for every layer, --json for a machine-readable report

step diffusers-sdnq verify uint4
sdnq verify "$work/uint4" --no-progress

step diffusers-sdnq dequantize uint4 plain --dtype bf16
sdnq dequantize "$work/uint4" "$work/plain" --dtype bf16 --no-progress
grep -q quantization_config "$work/plain/transformer/config.json" && { echo "plain config still quantized"; exit 1; }
echo "plain/transformer/config.json has no quantization_config: it loads with plain diffusers"

# A damaged download: cut 1000 bytes off the end of the transformer's weights. verify must fail (exit status 1).
cp -r "$work/uint4" "$work/broken"
file="$work/broken/transformer/diffusion_pytorch_model.safetensors"
"$python" -c 'import os, sys; os.truncate(sys.argv[1], os.path.getsize(sys.argv[1]) - 1000)' "$file"
step "diffusers-sdnq verify broken  (expected to fail)"
if sdnq verify "$work/broken" --no-progress; then
    echo "verify did not notice the truncated file"
    exit 1
else
    echo "verify exited with status $?, as expected"
fi
echo
echo "done; everything is in $work"
