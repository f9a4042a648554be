"""The DMD trainer end to end on 2 CPU ranks (real DeepSpeed ZeRO-3, gloo) over shards written by
precompute/encode.py from real clips: engine checks, bit-identical resume, export, bad input."""
import json
import subprocess
import sys

import pytest
import torch

from distill.models import OviFusion, load_ovi_checkpoint
from launcher import REPO, TINY_SCHEDULES, run_deepspeed, train_tiny

TRAIN = REPO / "distill" / "train.py"


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    return tiny_dataset   # conftest: shared with tests/test_evaluate.py


def losses(run) -> dict[int, dict]:
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {k: v for k, v in row.items()
                             if "loss" in k or "sigma" in k or "grad_norm" in k or "regression" in k or k.startswith("lr/")}
    return rows


def test_engines_gradients_counts_ema_teacher_export_flow(dataset, tmp_path):
    run_deepspeed(REPO / "tests/distributed/trainer_checks.py", "--data", str(dataset), "--out", str(tmp_path))
    for rank in (0, 1):
        r = json.loads((tmp_path / f"result.rank{rank}.json").read_text())
        for g in r["generator_steps"]:
            # teacher 2 (cond + uncond), fake score 1, student with grad 1, without grad = exit index
            calls = [tuple(c) for c in g["calls"]]
            assert calls.count(("teacher", False)) == 2 and calls.count(("fake_score", False)) == 1
            assert g["teacher_call_batches"] == [2], "cond + negative passes stacked into one call at 2x the batch"
            assert calls.count(("generator", True)) == 1 and calls.count(("generator", False)) == g["exit"]
            assert len(calls) == g["exit"] + 4
            assert g["generator_grad"] > 0 and g["fake_grad"] == 0
        for c in r["critic_steps"]:
            calls = [tuple(x) for x in c["calls"]]
            assert calls.count(("generator", False)) == c["exit"] + 1 and calls.count(("fake_score", True)) == 1
            assert len(calls) == c["exit"] + 2
            assert c["fake_grad"] > 0 and c["generator_grad"] == 0
        assert r["teacher_max_change"] == 0.0, "the frozen teacher changed"
        assert r["replicated_teacher_max_diff"] < 1e-5, r["replicated_teacher_max_diff"]
        assert r["leaf_modules_grad_max_diff"] == 0.0, r["leaf_modules_grad_max_diff"]
        assert r["generator_changed"] > 0
        assert r["ema_moved"] > 0, "the EMA did not move"
        assert r["ema_vs_reference"] == 0.0
        assert r["ema_vs_weights"] > 0, "an EMA with decay < 1 must lag the weights"
        assert r["flow_after"] < r["flow_before"], (r["flow_before"], r["flow_after"])
    r0 = json.loads((tmp_path / "result.rank0.json").read_text())
    assert r0["export_vs_generator_max_diff"] == 0.0


def test_resume_is_bit_identical_and_export_loads(dataset, tiny_run, tmp_path):
    """The shared run has warmup then cosine for the generator and linear to a floor for the critic
    (launcher.TINY_SCHEDULES): resume lands at the same point of both (functions of the step)."""
    whole, split = tiny_run, tmp_path / "split"      # whole: 9 steps in one go (the shared run)
    train_tiny(dataset, split, "--max-steps", "3", *TINY_SCHEDULES)
    train_tiny(dataset, split, "--max-steps", "9", "--resume", *TINY_SCHEDULES)
    a, b = losses(whole), losses(split)
    assert sorted(a) == list(range(9)) and all(a[s] for s in a)
    for step in range(3, 9):
        assert a[step] == b[step], f"step {step} differs after resume"
    # the logged rates are the schedules' values (tiny.yaml: both peaks 1e-4)
    assert [round(a[s]["lr/generator"] / 1e-4, 6) for s in range(9)] == [0.5, 1.0, 1.0, 0.775, 0.325] + [0.1] * 4
    assert [round(a[s]["lr/critic"] / 1e-4, 6) for s in range(9)] == [1.0, 0.9, 0.8, 0.7, 0.6] + [0.5] * 4
    checkpoints = sorted(p.name for p in (whole / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-000003", "step-000006", "step-000009"]
    assert (whole / "checkpoints" / "latest").read_text() == "step-000009"
    out = tmp_path / "student.safetensors"
    subprocess.run([sys.executable, "distill/export.py", "--checkpoint", str(whole), "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    student = OviFusion(OviFusion.from_variant("tiny").cfg)
    load_ovi_checkpoint(student, out)
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())


@pytest.mark.parametrize("extra, needle", [
    (["dmd.bogus=1"], "dmd.bogus"),
    (["dmd.cfg_video=-1"], "cfg_video"),
    (["model.variant=960x960_5s"], "model.checkpoint"),
])
def test_bad_config_stops_before_any_work(dataset, tmp_path, extra, needle):
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed", "ds_configs/zero3_cpu.json", "--config",
                           "distill/configs/tiny.yaml", "--data", str(dataset), "--out", str(tmp_path / "run"), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_pairs(dataset, tmp_path_factory):
    """Teacher pairs of the tiny dataset (distill/pairs.py with the tiny recipe: its CFG 4/3 and SLG block 1)."""
    out = tmp_path_factory.mktemp("tiny_pairs") / "pairs"
    subprocess.run([sys.executable, "distill/pairs.py", "--config", "distill/configs/tiny.yaml", "--data", str(dataset),
                    "--out", str(out), "--steps", "3", "--dtype", "float32"], cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    return out


def test_regression_on_teacher_pairs_trains_and_resumes_bit_identically(dataset, tiny_pairs, tmp_path):
    pairs = ("dmd.regression_weight=1.0", "dmd.renoise=implied", f"data.pairs={tiny_pairs}")
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_tiny(dataset, whole, "--max-steps", "6", *pairs)
    train_tiny(dataset, split, "--max-steps", "3", *pairs)
    train_tiny(dataset, split, "--max-steps", "6", "--resume", *pairs)
    a, b = losses(whole), losses(split)
    for step in range(3, 6):
        assert a[step] == b[step], f"step {step} differs after resume"
    for step in (0, 5):   # the generator steps (critic ratio 5) regress on the pair batch of their mode
        assert a[step]["generator/regression_video"] > 0 and a[step]["generator/regression_audio"] > 0, a[step]


def test_guided_finetune_trains_on_the_pairs_of_the_drawn_mode(dataset, tiny_pairs, tmp_path):
    """objective flow with data.pairs (the fine-tune before DMD with dmd.guidance=samples): every batch
    is the teacher's pairs of the mode the data stream drew, so on t2v alone it is the same run as
    flow on the pairs' t2v dataset itself, loss for loss."""
    flow = ("--max-steps", "3", "objective=flow", "data.i2v_ratio=0")
    train_tiny(dataset, tmp_path / "on_pairs", *flow, f"data.pairs={tiny_pairs}")
    train_tiny(tiny_pairs / "t2v", tmp_path / "pairs_as_data", *flow)
    a, b = losses(tmp_path / "on_pairs"), losses(tmp_path / "pairs_as_data")
    assert sorted(a) == [0, 1, 2] and a == b
    # its export says which guidance it learnt; DMD with guidance=samples accepts only such a teacher
    from distill.export import export, guided_samples_of
    guided = export(tmp_path / "on_pairs", tmp_path / "guided.safetensors", raw=True)
    plain = export(tmp_path / "pairs_as_data", tmp_path / "plain.safetensors", raw=True)
    assert guided_samples_of(guided) == {"cfg_video": 4.0, "cfg_audio": 3.0, "slg_block": 1}   # tiny.yaml's
    assert guided_samples_of(plain) is None
    for extra, needle in (([f"model.checkpoint={plain}"], "not a guided fine-tune's export"),
                          ([f"model.checkpoint={guided}", "dmd.cfg_video=2.0"], "fine-tuned on pairs made with"),
                          ([], "needs model.checkpoint")):
        proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed", "ds_configs/zero3_cpu.json", "--config",
                               "distill/configs/tiny.yaml", "--data", str(dataset), "--out", str(tmp_path / "dmd"),
                               "dmd.guidance=samples", *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "dmd").exists()
    # (the accepted case, DMD from the guided export, runs in the toy world's CI gate and the quickstart)


@pytest.mark.parametrize("extra, needle", [
    (["dmd.regression_weight=1.0", "dmd.renoise=implied"], "go together"),
    (["objective=flow", "data.i2v_ratio=0.5", "T2V_ONLY"], "has none for ['i2v']"),
    (["objective=flow", "dmd.slg_block=null", "PAIRS"], "slg_block"),
    (["dmd.regression_weight=1.0", "dmd.renoise=implied", "dmd.cfg_video=2.0", "PAIRS"], "cfg_video"),
    (["dmd.regression_weight=1.0", "PAIRS"], "renoise='implied'"),
])
def test_bad_pairs_settings_stop_before_any_work(dataset, tiny_pairs, tmp_path, extra, needle):
    t2v_only = tmp_path / "t2v_only"
    t2v_only.mkdir()
    (t2v_only / "t2v").symlink_to(tiny_pairs / "t2v")
    extra = [{"PAIRS": f"data.pairs={tiny_pairs}", "T2V_ONLY": f"data.pairs={t2v_only}"}.get(e, e) for e in extra]
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed", "ds_configs/zero3_cpu.json", "--config",
                           "distill/configs/tiny.yaml", "--data", str(dataset), "--out", str(tmp_path / "run"), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_scheduler_in_the_deepspeed_config_is_refused_before_any_work(dataset, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed", str(tmp_path / "ds.json"), "--config",
                           "distill/configs/tiny.yaml", "--data", str(dataset), "--out", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'scheduler' section" in proc.stderr and "generator_optim.schedule" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_dataset_names_the_path(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed", "ds_configs/zero3_cpu.json", "--config",
                           "distill/configs/tiny.yaml", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr
