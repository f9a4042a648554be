"""bench/evaluate_cost.py runs end to end (tiny models on the CPU, the evaluator's own functions), so
the GPU cost figure cannot rot unseen; and its depth option builds the shallower DiT it asks for."""
import json
import math
import os
import subprocess
import sys

import torch

from bench.inference import build_dit
from bench.launching import pythonpath_with
from launcher import REPO


def test_evaluate_cost_smoke(tmp_path):
    out = tmp_path / "cost.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath_with(REPO)}
    proc = subprocess.run([sys.executable, "bench/evaluate_cost.py", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Per checkpoint:" in proc.stdout and "Reference (one-off, 50 teacher steps" in proc.stdout
    r = json.loads(out.read_text())
    for attempt in (0, 1):
        stages = r[f"checkpoint_pass_{attempt}"]
        for key in ("student_sampling_s", "decode_mp4_sheet_s", "metrics_s"):
            assert math.isfinite(stages[key]) and stages[key] > 0, key
        assert math.isfinite(stages["score"])
    s = r["summary"]
    assert s["seconds_per_checkpoint"] == r["checkpoint_pass_1"]["total_s"]
    # 50 steps x 2 clips at the timed per-step cost, plus the clips' decode
    assert s["reference_dit_s_extrapolated"] == r["teacher_step_s"] * 50 * 2
    # a guided fine-tune's checkpoint: the student's sampling replaced by 50 unguided teacher steps a clip
    assert s["fine_tune_dit_s_extrapolated"] == r["unguided_teacher_step_s"] * 50 * 2
    steady = r["checkpoint_pass_1"]
    assert s["seconds_per_fine_tune_checkpoint_extrapolated"] == steady["total_s"] - steady["student_sampling_s"] + \
        s["fine_tune_dit_s_extrapolated"]
    assert "Per checkpoint of a guided fine-tune" in proc.stdout


def test_build_dit_takes_a_depth():
    model = build_dit("tiny", torch.device("cpu"), torch.float32, num_layers=1)
    assert len(model.video_model.blocks) == 1 and len(model.audio_model.blocks) == 1
