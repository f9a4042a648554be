"""distill/evaluate.py on a real 2-rank tiny DMD run with checkpoints at steps 3, 6 and 9 (plus one
still being written): mp4s read back, contact sheets, metrics, best.json, the offline wandb run,
reruns that skip what is done, export --step best, and the inputs that must stop it early."""
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from distill import evaluate
from distill.eval_store import load_latents
from bench.launching import pythonpath_with
from launcher import REPO
from test_sample import write_ppm

STEPS = (3, 6, 9)
CLIPS = ("000_0.mp4", "000_1.mp4", "001_0.mp4", "001_1.mp4")   # 2 prompts x 2 seeds
PROMPTS = [{"prompt": "A dog runs along the beach. <AUDCAP>waves, barking<ENDAUDCAP>"},
           {"prompt": "A red ball rolls. <AUDCAP>a soft thud<ENDAUDCAP>", "image": "first.ppm"}]


def write_prompts(folder: Path, rows=PROMPTS) -> Path:
    write_ppm(folder / "first.ppm", 48, 96)          # wide: cropped into the tiny variant's 64x64
    path = folder / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_evaluate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath_with(REPO)}
    proc = subprocess.run([sys.executable, "distill/evaluate.py", "--no-progress", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """A copy of the shared run, a checkpoint being written (no COMPLETE yet), one --once pass."""
    root = tmp_path_factory.mktemp("evaluate")
    run = root / "run"
    shutil.copytree(tiny_run, run)
    shutil.copytree(run / "checkpoints" / "step-000009", run / "checkpoints" / "step-000012")
    (run / "checkpoints" / "step-000012" / "COMPLETE").unlink()
    prompts = write_prompts(root)
    proc = run_evaluate("--run", str(run), "--prompts", str(prompts), "--seeds", "2", "--once")
    return run, prompts, proc


def read_clip(path: Path) -> dict:
    with av.open(str(path)) as container:
        video, audio = container.streams.video, container.streams.audio
        frames = sum(1 for _ in container.decode(video=0))
        return dict(streams=(len(video), len(audio)), codecs=(video[0].codec_context.name, audio[0].codec_context.name),
                    size=(video[0].height, video[0].width), frames=frames, sample_rate=audio[0].sample_rate)


def test_every_complete_checkpoint_gets_clips_sheet_metrics(evaluated):
    run, _, proc = evaluated
    assert "evaluated 3 checkpoint(s) [3, 6, 9]" in proc.stdout
    for folder in [run / "eval" / "reference"] + [run / "eval" / f"step-{s:06d}" for s in STEPS]:
        for name in CLIPS:
            clip = read_clip(folder / name)
            assert clip == dict(streams=(1, 1), codecs=("h264", "aac"), size=(64, 64), frames=17, sample_rate=16000)
        sheet = Image.open(folder / "contact_sheet.png")
        assert sheet.format == "PNG" and sheet.width > 4 * 64 and sheet.height > 4 * 64   # 4 rows of 4 frames + spectrogram
        sheet_pixels = np.asarray(sheet.convert("RGB"))
        assert sheet_pixels.std() > 5, "the sheet is blank"
    assert not (run / "eval" / "step-000012").exists(), "a checkpoint without COMPLETE must wait"

    rows = [json.loads(line) for line in (run / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(STEPS)
    scores = {}
    for step in STEPS:
        result = json.loads((run / "eval" / f"step-{step:06d}" / "metrics.json").read_text())
        assert result["step"] == step and result["sampler"]["sigmas"][0] == 1.0
        assert result["grouped_by_prompt"] is True      # 2 seeds per prompt: metrics prompt by prompt
        assert np.isfinite(list(result["metrics"].values())).all()
        scores[step] = result["metrics"]["score"]
    best = json.loads((run / "eval" / "best.json").read_text())
    assert best["step"] == min(scores, key=lambda s: (scores[s], s)) and best["score"] == scores[best["step"]]
    assert "lowest score" in best["rule"]
    kept = [p.parent.name for p in (run / "checkpoints").glob("step-*/KEEP")]
    assert kept == [f"step-{best['step']:06d}"], "the best checkpoint is protected from pruning, only it"


def test_student_and_reference_share_noise_and_first_frame(evaluated):
    run, _, _ = evaluated
    ref_video, ref_audio = load_latents(run / "eval" / "reference" / "latents.safetensors")
    assert tuple(ref_video.shape) == (4, 48, 5, 4, 4) and tuple(ref_audio.shape) == (4, 22, 20)
    student_video, _ = load_latents(run / "eval" / "step-000009" / "latents.safetensors")
    # clips 001_* are image-to-video: both pinned frame 0 to the same image latent; clips 000_* are not
    assert (student_video[2:, :, 0] == ref_video[2:, :, 0]).all()
    assert not (student_video[0, :, 0] == ref_video[0, :, 0]).all()
    reference = json.loads((run / "eval" / "reference" / "reference.json").read_text())
    assert reference["spec"]["sampler"]["steps"] == 50 and reference["spec"]["sampler"]["slg_block"] == 1  # tiny.yaml's
    assert [c["image"] is not None for c in reference["spec"]["clips"]] == [False, False, True, True]


def wandb_records(run_dir: Path):
    """The records of a wandb .wandb file (LevelDB log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    pos, block, chunks = 7, 32768, b""          # 7: the file header (":W&B", magic, version)
    while pos + 7 <= len(data):
        if block - pos % block < 7:             # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                      # FULL or LAST: a record is complete
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_the_offline_wandb_run_holds_metrics_and_media(evaluated):
    run, _, _ = evaluated
    [wandb_dir] = list((run / "eval" / "wandb").glob("offline-run-*"))
    history, runs = [], []
    for record in wandb_records(wandb_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {}
            for item in record.history.item:   # media come as nested keys: (name, field) -> value
                path = [item.key] if item.key else list(item.nested_key)
                if len(path) == 1:
                    row[path[0]] = json.loads(item.value_json)
                else:
                    row.setdefault(path[0], {})["/".join(path[1:])] = json.loads(item.value_json)
            history.append(row)
        elif kind == "run":
            runs.append(record.run)
    assert [h["train_step"] for h in history] == list(STEPS)
    assert all(np.isfinite(h["eval/score"]) and "eval/fd_video" in h for h in history)
    assert {h["eval/contact_sheet"]["_type"] for h in history} == {"image-file"}
    assert {h["eval/clip/001_0"]["_type"] for h in history} == {"video-file"}
    assert runs[0].project == "ovi-dmd" and runs[0].job_type == "eval"
    assert runs[0].run_group == (run / "wandb_run_id").read_text().strip(), "grouped with the training run"
    media = wandb_dir / "files" / "media"
    assert len(list((media / "images").rglob("*.png"))) == 3
    assert len(list((media / "videos").rglob("*.mp4"))) == 3 * len(CLIPS)


def test_reruns_skip_what_is_done_and_pick_up_what_completed(evaluated, tmp_path):
    run, prompts, _ = evaluated
    stamps = {p: p.stat().st_mtime_ns for p in (run / "eval").glob("step-*/metrics.json")}
    proc = run_evaluate("--run", str(run), "--prompts", str(prompts), "--seeds", "2")
    assert "nothing to evaluate" in proc.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in (run / "eval").glob("step-*/metrics.json")}

    (run / "checkpoints" / "step-000012" / "COMPLETE").touch()   # the trainer finished writing it
    proc = run_evaluate("--run", str(run), "--prompts", str(prompts), "--seeds", "2", "--watch", "--poll-s", "0.1")
    assert "evaluated 1 checkpoint(s) [12]" in proc.stdout and "final step 9 is evaluated" in proc.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    rows = (run / "eval" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [*STEPS, 12]

    best = json.loads((run / "eval" / "best.json").read_text())
    out = tmp_path / "best.safetensors"
    proc = subprocess.run([sys.executable, "distill/export.py", "--checkpoint", str(run), "--step", "best",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["source"].endswith(f"step-{best['step']:06d}")


# Bad inputs: exit 2 naming the problem, before any model loads ---------------------------------

@pytest.fixture
def no_models(monkeypatch):
    """A tripwire, not a stand-in: the test fails if the evaluator gets as far as loading models."""
    def tripwire(*_, **__):
        raise AssertionError("models were loaded for a bad input")
    monkeypatch.setattr(evaluate.Evaluator, "__init__", tripwire)


def bad_input(capsys, *args: str) -> str:
    code = evaluate.main(["--no-progress", *args])
    err = capsys.readouterr().err
    assert code == evaluate.EXIT_USAGE, err
    return err


def test_no_run_and_no_checkpoint_are_named(tmp_path, tiny_run, capsys, no_models):
    prompts = write_prompts(tmp_path)
    assert "nope: no such directory" in bad_input(capsys, "--run", str(tmp_path / "nope"), "--prompts", str(prompts))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no complete checkpoint" in bad_input(capsys, "--run", str(empty), "--prompts", str(prompts))
    shutil.copytree(tiny_run / "checkpoints" / "step-000003", empty / "checkpoints" / "step-000003",
                    ignore=shutil.ignore_patterns("generator", "fake_score"))
    (empty / "checkpoints" / "step-000003" / "COMPLETE").unlink()
    err = bad_input(capsys, "--run", str(empty), "--prompts", str(prompts))
    assert "no complete checkpoint" in err and "without COMPLETE: step-000003" in err
    assert not (empty / "eval").exists()


@pytest.mark.parametrize("content, needle", [
    ("", "no prompts"),
    ('{"prompt": "a cat"}\nnot json\n', "prompts.jsonl:2: not a JSON object"),
    ('{"prompt": "a cat", "image": "missing.png"}\n', "missing.png: no such file"),
    ('{"text": "a cat"}\n', "prompts.jsonl:1: expected"),
])
def test_bad_prompt_files_are_named(evaluated, tmp_path, capsys, no_models, content, needle):
    run, _, _ = evaluated
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    assert needle in bad_input(capsys, "--run", str(run), "--prompts", str(prompts))


def test_missing_encoder_and_teacher_files_are_named(evaluated, tmp_path, capsys, no_models):
    run, prompts, _ = evaluated
    err = bad_input(capsys, "--run", str(run), "--prompts", str(prompts), "--encoders", str(tmp_path / "ckpts"))
    for missing in ("Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "v1-16.pth", "best_netG.pt"):
        assert f"{missing} does not exist" in err
    err = bad_input(capsys, "--run", str(run), "--prompts", str(prompts), "--teacher", str(tmp_path / "t.safetensors"))
    assert "t.safetensors: no such file" in err


def test_a_reference_for_other_prompts_asks_for_make_reference(evaluated, tmp_path, capsys, no_models):
    run, _, _ = evaluated
    other = tmp_path / "other.txt"
    other.write_text("A cat sleeps. <AUDCAP>purring<ENDAUDCAP>\n")
    err = bad_input(capsys, "--run", str(run), "--prompts", str(other))
    assert "was made for other clips" in err and "--make-reference" in err


def test_prune_spares_the_checkpoint_marked_keep(tmp_path):
    from distill import checkpoint
    for step in (3, 6, 9, 12):
        path = checkpoint.step_dir(tmp_path, step)
        path.mkdir(parents=True)
        (path / "COMPLETE").touch()
    (checkpoint.step_dir(tmp_path, 3) / checkpoint.KEEP_FILE).touch()
    checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.complete_steps(tmp_path)] == ["step-000003", "step-000009", "step-000012"]


@pytest.mark.parametrize("guidance, teacher_given, expected", [
    ("score", False, (4.0, 3.0, 11)),
    ("samples", False, (1.0, 1.0, None)),    # the fine-tuned teacher is the guided samples' score: no CFG on it
    ("samples", True, (4.0, 3.0, 11)),       # --teacher ORIGINAL: the original with the run's CFG + SLG
])
def test_reference_guidance_follows_the_runs_dmd_guidance(tmp_path, guidance, teacher_given, expected):
    from distill.evaluate import RunInfo
    config = {"model": {"variant": "tiny", "checkpoint": "guided.safetensors"}, "dmd": {
        "cfg_video": 4.0, "cfg_audio": 3.0, "slg_block": 11, "guidance": guidance}}
    (tmp_path / "trainer.json").write_text(json.dumps({"config": config}))
    sampler = RunInfo.from_checkpoint(tmp_path, 50, teacher_given=teacher_given).teacher_cfg
    assert (sampler.cfg_video, sampler.cfg_audio, sampler.slg_block, sampler.steps) == (*expected, 50)


# A guided fine-tune's run (stage 2) ---------------------------------------------------------------

def test_a_guided_finetune_is_sampled_unguided_against_the_guided_reference(tiny_dataset, tmp_path):
    """A flow run on teacher pairs whose rate (1e-30) leaves it at the teacher: its checkpoints, sampled
    as the evaluator samples a fine-tune (the reference's steps, no CFG, no SLG, the reference's noise),
    must give the start's samples (the teacher the same way) and close none of the gap to the guided
    reference; a guided or 4-step sampling of them would not."""
    from launcher import run_deepspeed
    pairs = tmp_path / "pairs"
    subprocess.run([sys.executable, "distill/pairs.py", "--config", "distill/configs/tiny.yaml", "--data",
                    str(tiny_dataset), "--out", str(pairs), "--steps", "3", "--dtype", "float32"], cwd=REPO,
                   check=True, capture_output=True, timeout=600)
    ds_config = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    ds_config["bf16"]["enabled"] = False   # fp32 weights: the fine-tune's EMA is the teacher's init itself
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    run = tmp_path / "run"
    run_deepspeed(REPO / "distill" / "train.py", "--deepspeed", str(tmp_path / "ds.json"), "--config",
                  "distill/configs/tiny.yaml", "--data", str(tiny_dataset), "--out", str(run), "--max-steps", "4",
                  "--save-every", "2", "objective=flow", f"data.pairs={pairs}", "generator_optim.lr=1e-30", nproc=1)
    prompts = write_prompts(tmp_path)
    proc = run_evaluate("--run", str(run), "--prompts", str(prompts), "--reference-steps", "3", "--dtype", "fp32")
    assert "the fine-tune's start" in proc.stdout and "evaluated 2 checkpoint(s) [2, 4]" in proc.stdout

    reference = json.loads((run / "eval" / "reference" / "reference.json").read_text())["spec"]
    assert (reference["sampler"]["cfg_video"], reference["sampler"]["slg_block"]) == (4.0, 1)   # tiny.yaml's pairs
    assert (reference["start_sampler"]["cfg_video"], reference["start_sampler"]["cfg_audio"],
            reference["start_sampler"]["slg_block"], reference["start_sampler"]["steps"]) == (1.0, 1.0, None, 3)
    ref_video, _ = load_latents(run / "eval" / "reference" / "latents.safetensors")
    start_video, start_audio = load_latents(run / "eval" / "reference" / "start_latents.safetensors")
    assert (start_video - ref_video).abs().max() > 1e-2, "the start must be the unguided sampling"
    for step in (2, 4):
        result = json.loads((run / "eval" / f"step-{step:06d}" / "metrics.json").read_text())
        assert result["sampler"]["model"] == "guided fine-tune" and result["sampler"]["steps"] == 3
        video, audio = load_latents(run / "eval" / f"step-{step:06d}" / "latents.safetensors")
        torch.testing.assert_close(video, start_video, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(audio, start_audio, atol=1e-5, rtol=1e-5)
        metrics, start = result["metrics"], result["start_metrics"]
        assert start["score"] > 0 and metrics["gap_closed"] == pytest.approx(1 - metrics["score"] / start["score"])
        assert abs(metrics["gap_closed"]) < 1e-3
