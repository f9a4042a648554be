#!/usr/bin/env bash
# The whole pipeline on this machine's CPU with tiny seeded models, in a few minutes:
#   real mp4 clips with audio -> precompute shards -> teacher pairs -> the teacher fine-tuned on them
#   -> DMD from it on 2 CPU ranks (DeepSpeed ZeRO-3, gloo) -> export the student (official Ovi key
#   names) -> 4-step sample to mp4.
# Usage: bash launch/quickstart.sh [RUN_DIR]     (default: runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/quickstart}
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ovi_dmd_torch_ext}"
export WANDB_MODE=offline
mkdir -p "$RUN/clips"
start=$(date +%s)

echo "== 1/7 making clips (real H.264 + AAC mp4) in $RUN/clips"
python3 - "$RUN/clips" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from clips import make_clip  # the same clip maker the tests use
out = Path(sys.argv[1])
prompts = ["<S>Hello there.<E> A person waves at the camera. <AUDCAP>A clear voice, light wind.<ENDAUDCAP>",
           "<S>It works!<E> Someone smiles in a bright room. <AUDCAP>Speech and soft music.<ENDAUDCAP>",
           "A ball bounces across a wooden floor. <AUDCAP>Bouncing thuds.<ENDAUDCAP>",
           "Waves roll onto a beach at sunset. <AUDCAP>Ocean waves.<ENDAUDCAP>"]
rows = ["video,prompt"]
for i, prompt in enumerate(prompts * 2):   # 8 clips: pairs of both modes for each of the 2 ranks
    make_clip(out / f"clip{i}.mp4", seconds=1.0, fps=(24, 25, 30, 24)[i % 4], width=96, height=64 + 16 * (i % 4),
              seed=i, click_at=0.4)
    rows.append(f'clip{i}.mp4,"{prompt}"')
(out / "manifest.csv").write_text("\n".join(rows) + "\n")
(out / "prompts.txt").write_text("\n".join(prompts[:2]) + "\n")
PY

echo "== 2/7 precompute: tiny Wan2.2 VAE, MMAudio VAE, umT5 -> shards"
python3 precompute/encode.py --manifest "$RUN/clips/manifest.csv" --shards "$RUN/data" --variant tiny

echo "== 3/7 teacher pairs: the guided teacher's 50-step samples from seeded noise"
python3 distill/pairs.py --config distill/configs/tiny.yaml --data "$RUN/data" --out "$RUN/pairs"

echo "== 4/7 guided fine-tune: flow matching of the teacher on its own CFG+SLG samples (2 CPU ranks)"
python3 -m deepspeed.launcher.runner --num_gpus 2 distill/train.py --deepspeed ds_configs/zero3_cpu.json \
    --config distill/configs/tiny.yaml --data "$RUN/data" --out "$RUN/guided" --max-steps 6 --save-every 6 --resume \
    objective=flow data.pairs="$RUN/pairs" ema.enabled=false
python3 distill/export.py --checkpoint "$RUN/guided" --out "$RUN/guided.safetensors" --raw

echo "== 5/7 distill: DMD from the fine-tuned teacher (queried without CFG) with the anchor on the pairs, three ZeRO-3 engines on 2 CPU ranks"
python3 -m deepspeed.launcher.runner --num_gpus 2 distill/train.py --deepspeed ds_configs/zero3_cpu.json \
    --config distill/configs/tiny.yaml --data "$RUN/data" --out "$RUN/run" --max-steps 10 --save-every 5 --resume \
    model.checkpoint="$RUN/guided.safetensors" dmd.guidance=samples dmd.renoise=implied \
    dmd.regression_weight=0.1 data.pairs="$RUN/pairs"

echo "== 6/7 export the student (EMA, bf16, official key names)"
python3 distill/export.py --checkpoint "$RUN/run" --out "$RUN/student.safetensors"

echo "== 7/7 sample 4 steps to mp4"
if [ -f distill/sample.py ]; then
  python3 distill/sample.py --student "$RUN/student.safetensors" --variant tiny --prompts "$RUN/clips/prompts.txt" \
      --out "$RUN/samples"
  samples=$(ls "$RUN"/samples/*.mp4 2>/dev/null | tr '\n' ' ')
else
  samples="(not built yet: distill/sample.py is an open issue)"
fi

cat <<SUMMARY

quickstart finished in $(( $(date +%s) - start )) s
  clips + manifest : $RUN/clips/manifest.csv
  shards           : $RUN/data/shards  (index.parquet, dataset.json, failures.jsonl beside them)
  teacher pairs    : $RUN/pairs  (t2v/ and i2v/, each a dataset of the teacher's samples)
  guided teacher   : $RUN/guided.safetensors  (the teacher fine-tuned on the pairs)
  training run     : $RUN/run  (metrics.jsonl, checkpoints/latest -> $(cat "$RUN/run/checkpoints/latest"))
  student          : $RUN/student.safetensors
  samples          : $samples
SUMMARY
