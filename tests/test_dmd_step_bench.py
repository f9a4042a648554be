"""bench/dmd_step.py runs end to end (tiny width, 2 CPU ranks, the real DeepSpeed launcher): both
teacher shardings, both layouts of the teacher's passes, two batch sizes and the phase breakdown, so the GPU benchmark cannot rot unseen."""
import json
import math
import subprocess
import sys

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
        assert r["world"] == 2 and r["device"] == "cpu"

    # the table joins the rows with a probe line as probe_three_engines.py prints it
    probe = tmp_path / "probe.jsonl"
    probe.write_text(json.dumps({"world": 2, "L": 2, "D": 64, "N": rows[0]["video_tokens"], "params_M": 1,
                                 "gen": {"s": 0.1, "tflops_per_gpu": 2 * rows[0]["generator_tflops_per_gpu"], "peak_gib": 1},
                                 "critic": {"s": 0.1, "tflops_per_gpu": 4 * rows[0]["critic_tflops_per_gpu"], "peak_gib": 1}}) + "\n")
    table = tmp_path / "table.json"
    printed = subprocess.run([sys.executable, "bench/dmd_step_table.py", "--runs", f"now={out}", "--probes", str(probe),
                              "--out", str(table)], cwd=REPO, check=True, capture_output=True, text=True).stdout
    first = json.loads(table.read_text())["rows"][0]
    assert {"world", "batch_per_gpu", "grid", "generator_s", "critic_s", "generator_ratio_to_probe", "critic_ratio_to_probe",
            "generator_ratio_to_reference", "critic_ratio_to_reference", "device"} <= set(first)
    assert math.isclose(first["generator_ratio_to_probe"], 0.5) and math.isclose(first["critic_ratio_to_probe"], 0.25)
    assert first["generator_ratio_to_reference"] is None, "no --reference on CPU"
    assert "| now | smoke | 1 |" in printed
