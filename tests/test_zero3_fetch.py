"""distill/zero3_fetch.py on a real single-rank ZeRO-3 engine (CPU, the real DeepSpeed launcher)."""
import json

from launcher import REPO, run_deepspeed


def test_single_rank_fetch_without_host_sync_gives_deepspeeds_update(tmp_path):
    run_deepspeed(REPO / "tests/distributed/fetch_checks.py", "--out", str(tmp_path), nproc=1)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["installed"] and r["restored"]
    assert r["fetches_without_wait"] > 10, "the engine did not fetch through the patched wait"
    assert r["loss_diff"] == 0.0 and r["grad_max_diff"] == 0.0 and r["weight_max_diff"] == 0.0, r
    assert r["on_device"] is True and r["elsewhere"] is False
