"""The trainer's update path on 2 CPU ranks (real DeepSpeed ZeRO-3, gloo): the NaN guard without a
host read, torch's fused AdamW against today's AdamW, the exit index without a broadcast."""
import json

from launcher import REPO, run_deepspeed

FP32_EPS = 2.0**-23


def test_update_skips_fuses_and_agrees(tmp_path):
    run_deepspeed(REPO / "tests/distributed/update_checks.py", "--out", str(tmp_path))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        # rank 1's loss was NaN: the update is skipped on both ranks and leaves nothing behind
        assert r["nan_flag"] is False
        assert r["nan_weights_change"] == 0.0 and r["nan_state_change"] == 0.0
        assert r["finite_flag"] is True and r["finite_weights_change"] > 0
        assert r["skip_then_update_vs_fresh_update"] == 0.0
        # the config's fused flag reaches torch, and the update equals today's within fp32 rounding
        assert r["fused_flag_reached_torch"] is True and not r["today_fused"]
        assert r["update_size"] > 1e3 * FP32_EPS * r["weight_scale"], "too small an update to compare"
        assert r["fused_vs_today"] <= 3 * 4 * FP32_EPS * max(r["weight_scale"], 1.0), r
        assert r["exit_draws_agree"] and r["exit_draws_agree_after_share"]
