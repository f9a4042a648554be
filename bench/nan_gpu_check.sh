#!/usr/bin/env bash
# Issue 18's GPU check: the tiny recipe in bf16 (ds_configs/zero3.json) on mixed-aspect shards,
# 300 steps on 1 GPU, must skip no step. Makes the clips (tests/clips.py MIXED_ASPECT_CLIPS: 4:3,
# 16:9, 16:9 stereo at 30 fps, square at 25 fps, the 200x356 portrait whose 96x32 bucket gave NaN,
# an mkv with Vorbis audio), precomputes them with the tiny encoders, trains, and prints the count.
#
#   bash bench/nan_gpu_check.sh [WORKDIR]          exit 0: no skipped step; 1: some (listed)
#
# Env: STEPS (default 300), DS_CONFIG (default ds_configs/zero3.json), NPROC (default 1),
# PRECOMPUTE_ONLY=1 (stop after the shards). Without a GPU it runs the same on CPU (DeepSpeed's cpu
# accelerator, gloo): STEPS=6 checks the script. An existing WORKDIR/data is reused, so on a GPU
# machine without PyAV/decord: PRECOMPUTE_ONLY=1 here on a CPU box, then carry WORKDIR over.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$(mktemp -d -t nan_gpu_check.XXXXXX)}
STEPS=${STEPS:-300}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
NPROC=${NPROC:-1}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: running on CPU (DeepSpeed cpu accelerator)"
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
mkdir -p "$WORK"
echo "work directory: $WORK"

if [ ! -f "$WORK/data/index.parquet" ]; then
    python - "$WORK/clips" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from clips import make_mixed_aspect_manifest

print("clips:", make_mixed_aspect_manifest(Path(sys.argv[1])))
EOF
    python precompute/encode.py --manifest "$WORK/clips/manifest.csv" --shards "$WORK/data" --variant tiny
fi

if [ "${PRECOMPUTE_ONLY:-0}" = 1 ]; then
    echo "shards in $WORK/data"
    exit 0
fi

rm -rf "$WORK/run"
python -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29517}" distill/train.py \
    --deepspeed "$DS_CONFIG" --config distill/configs/tiny.yaml --data "$WORK/data" --out "$WORK/run" \
    --max-steps "$STEPS" --save-every "$STEPS" log.wandb_mode=disabled 2>&1 | tee "$WORK/train.log" | grep -E "warning|error|saved" || true

if [ ! -s "$WORK/run/metrics.jsonl" ]; then
    echo "nan_gpu_check: training logged nothing; see $WORK/train.log"
    exit 1
fi
python - "$WORK/run/metrics.jsonl" "$STEPS" "$DS_CONFIG" <<'EOF'
import json
import sys

path, steps, ds_config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = {}
for line in open(path):
    row = json.loads(line)
    rows[row["step"]] = row
skipped = {step: row.get("skipped_keys") for step, row in sorted(rows.items()) if not row["finite"]}
print(f"nan_gpu_check: {len(rows)}/{steps} steps logged, {len(skipped)} skipped (non-finite), {ds_config}")
for step, keys in skipped.items():
    print(f"  step {step}: sample keys per rank {keys}")
sys.exit(0 if len(rows) == steps and not skipped else 1)
EOF
