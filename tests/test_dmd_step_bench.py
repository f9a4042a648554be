"""bench/dmd_step.py runs end to end (tiny width, 2 CPU ranks, the real DeepSpeed launcher): both
teacher shardings, both layouts of the teacher's passes, two batch sizes and the phase breakdown, so the GPU benchmark cannot rot unseen."""
import json
import math

from launcher import REPO, run_deepspeed


def test_dmd_step_bench_smoke(tmp_path):
    out = tmp_path / "dmd_step.json"
    run_deepspeed(REPO / "bench/dmd_step.py", "--smoke", "--teacher", "both", "--batches", "1", "2", "--iters", "1",
                  "--no-random-exit", "--breakdown", "--stack-teacher", "both", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch_per_gpu"] for r in rows] == [1, 2]
    for r in rows:
        assert r["zero3_leaf_modules"] is True
        assert r["stack_teacher_passes"] is True  # the config's default, timed first; the other layout second
        for key in ("generator_s", "critic_s", "generator_s_replicated_teacher", "generator_s_separate_teacher"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        phases = r["breakdown_s"]
        assert {"G fwd", "R fwd (no grad)", "F fwd", "G optimizer step", "F backward"} <= set(phases)
        assert phases["generator step total"] >= phases["G backward"] + phases["G optimizer step"]
