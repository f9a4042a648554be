"""distill/sample.py end to end on CPU with the tiny models: prompts -> student (or teacher) ->
decoders -> real mp4 files, read back with PyAV; plus the inputs that must stop it early."""
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from distill.models import OviFusion, save_ovi_checkpoint
from distill.sample import (
    EXIT_USAGE, SETTINGS_FILE, Job, batches_of, job_noise, load_model, main, parse_args, resolve_model,
)
from precompute.variants import AUDIO_SAMPLE_RATE, AUDIO_SAMPLES_PER_LATENT, FPS, get_variant, snap_to_area


REPO = Path(__file__).resolve().parents[1]
TINY = get_variant("tiny")
PROMPTS = (
    "A man turns and says <S>We have to leave now.<E> Audio: rain, a calm male voice.\n"
    "\n"  # blank lines are skipped
    "A dog runs along the beach. <AUDCAP>waves, barking<ENDAUDCAP>\n"
)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("student") / "student.safetensors"
    return save_ovi_checkpoint(OviFusion.from_variant("tiny").state_dict(), path, dtype=torch.float32,
                               metadata={"variant": "tiny"})


def write_prompts(folder: Path, text: str = PROMPTS) -> Path:
    path = folder / "prompts.txt"
    path.write_text(text)
    return path


def write_ppm(path: Path, height: int, width: int) -> Path:
    """A binary PPM (ffmpeg reads it as an image): a horizontal colour ramp."""
    ramp = np.linspace(0, 255, width, dtype=np.uint8)
    rgb = np.stack([np.broadcast_to(ramp, (height, width)), np.full((height, width), 90, np.uint8),
                    np.broadcast_to(ramp[::-1], (height, width))], axis=-1)
    path.write_bytes(f"P6\n{width} {height}\n255\n".encode() + np.ascontiguousarray(rgb).tobytes())
    return path


def read_back(path: Path) -> dict:
    """What a player sees: the streams, their rates and sizes, every decoded frame and sample."""
    with av.open(str(path)) as container:
        videos, audios = container.streams.video, container.streams.audio
        info = dict(n_video=len(videos), n_audio=len(audios), fps=videos[0].average_rate,
                    width=videos[0].width, height=videos[0].height, sample_rate=audios[0].sample_rate,
                    audio_duration=float(audios[0].duration * audios[0].time_base), codecs=(
                        videos[0].codec_context.name, audios[0].codec_context.name))
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return {**info, "frames": frames, "audio": audio}


def check_clip(path: Path, height: int, width: int) -> dict:
    clip = read_back(path)
    assert (clip["n_video"], clip["n_audio"]) == (1, 1)
    assert clip["codecs"] == ("h264", "aac")
    assert clip["fps"] == FPS
    assert len(clip["frames"]) == TINY.frames
    assert (clip["height"], clip["width"]) == (height, width)
    assert clip["frames"][0].shape == (height, width, 3)
    assert clip["sample_rate"] == AUDIO_SAMPLE_RATE
    expected_s = TINY.audio_latents * AUDIO_SAMPLES_PER_LATENT / AUDIO_SAMPLE_RATE
    assert abs(clip["audio_duration"] - expected_s) <= AUDIO_SAMPLES_PER_LATENT / AUDIO_SAMPLE_RATE
    assert abs(clip["audio"].size - TINY.audio_samples) <= AUDIO_SAMPLES_PER_LATENT
    assert np.abs(clip["audio"]).max() > 1e-3  # the vocoder's output got through, not silence
    return clip


def test_student_end_to_end(tmp_path, student):
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "distill" / "sample.py"), "--student", str(student), "--variant", "tiny",
           "--prompts", str(write_prompts(tmp_path)), "--out", str(out), "--seed", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student" in proc.stderr and "100%" in proc.stderr  # the progress bar ran to the end

    size = snap_to_area(*TINY.default_hw, TINY.area)
    assert size == (64, 64)
    clips = [check_clip(out / name, *size) for name in ("000_7.mp4", "001_7.mp4")]
    # different prompts and noise: the two clips must not be the same picture
    assert not np.array_equal(clips[0]["frames"][8], clips[1]["frames"][8])

    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["model"] == {"kind": "student", "weights": "safetensors", "path": str(student)}
    assert settings["sampler"]["steps"] == 4 and settings["seeds"] == [7]
    assert settings["prompts"][0].endswith("<AUDCAP>rain, a calm male voice.<ENDAUDCAP>")  # tiny = audcap style
    assert [o["file"] for o in settings["outputs"]] == ["000_7.mp4", "001_7.mp4"]
    assert {k for k in settings["timings_s"]} >= {"text", "dit", "decode"}


def test_teacher_image_to_video(tmp_path):
    """--teacher with --steps 3 and a wide first frame: the image's aspect sets the size."""
    teacher = save_ovi_checkpoint(OviFusion.from_variant("tiny", seed=3).state_dict(), tmp_path / "teacher.safetensors",
                                  dtype=torch.float32)
    image = write_ppm(tmp_path / "first.ppm", 48, 96)
    out = tmp_path / "out"
    code = main(["--teacher", str(teacher), "--variant", "tiny", "--prompts",
                 str(write_prompts(tmp_path, "A red ball rolls. <AUDCAP>a soft thud<ENDAUDCAP>\n")),
                 "--out", str(out), "--image", str(image), "--steps", "3", "--seeds", "2", "--no-progress"])
    assert code == 0

    size = snap_to_area(48, 96, TINY.area)
    assert size == (32, 96)
    for seed in (0, 1):
        check_clip(out / f"000_{seed}.mp4", *size)
    settings = json.loads((out / SETTINGS_FILE).read_text())
    assert settings["model"]["kind"] == "teacher"
    assert settings["sampler"]["steps"] == 3 and settings["sampler"]["slg_block"] == 11
    assert settings["outputs"][0]["image"] == str(image)
    assert settings["negatives"]["video"]


def test_job_noise_is_per_prompt_and_seed():
    job = Job(index=1, seed=5, prompt="p", size=(64, 64))
    video, audio = job_noise(job, TINY, (48, 20))
    assert video.shape == (48, TINY.latent_frames, 4, 4) and audio.shape == (TINY.audio_latents, 20)
    again, _ = job_noise(Job(index=1, seed=5, prompt="other prompt, same slot", size=(64, 64)), TINY, (48, 20))
    assert torch.equal(video, again)
    for other in (Job(index=0, seed=5, prompt="p", size=(64, 64)), Job(index=1, seed=6, prompt="p", size=(64, 64))):
        assert not torch.equal(video, job_noise(other, TINY, (48, 20))[0])


def test_batches_never_mix_sizes_or_modes():
    image = Path("x.png")
    jobs = [Job(0, 0, "a", (64, 64)), Job(1, 0, "b", (32, 96), image), Job(2, 0, "c", (64, 64)),
            Job(3, 0, "d", (64, 64), image), Job(4, 0, "e", (64, 64))]
    batches = batches_of(jobs, 2)
    assert sorted(j.index for b in batches for j in b) == [0, 1, 2, 3, 4]
    for batch in batches:
        assert len(batch) <= 2
        assert len({(j.size, j.image is not None) for j in batch}) == 1


def write_run(root: Path, state: dict, dmd: dict) -> Path:
    """A training run dir as distill/train.py leaves it: one complete step with an EMA shard."""
    step = root / "run" / "checkpoints" / "step-000005"
    (step / "ema").mkdir(parents=True)
    names = list(state)
    torch.save({"world": 1, "rank": 0, "names": names, "shards": [state[n].reshape(-1).clone() for n in names],
                "numel": [state[n].numel() for n in names], "shape": [list(state[n].shape) for n in names]},
               step / "ema" / "rank-00000.pt")
    config = {"model": {"variant": "tiny", "num_layers": None}, "dmd": dmd}
    (step / "trainer.json").write_text(json.dumps({"config": config}))
    (step / "COMPLETE").write_text("")
    (root / "run" / "checkpoints" / "latest").write_text("step-000005")
    return step


def test_student_from_training_checkpoint_uses_its_ema(tmp_path):
    """A run dir resolves to its latest complete step, and the DiT gets the EMA weights."""
    state = OviFusion.from_variant("tiny", seed=11).state_dict()
    step = write_run(tmp_path, state, {"student_sigmas": [1.0, 0.5], "renoise": "implied"})
    cfg = parse_args(["--student", str(tmp_path / "run"), "--variant", "tiny", "--prompts", "p", "--out", "o"])
    source = resolve_model(cfg)
    assert (source.weights, source.path, source.sigmas, source.renoise) == ("ema", step, (1.0, 0.5), "implied")
    loaded = load_model(source, TINY, torch.device("cpu"), torch.float32).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_exported_student_carries_the_sampler_it_was_trained_for(tmp_path):
    """export.py writes the run's σ list and re-noising into the file's metadata; sample.py reads them
    back (the Ovi key names and tensors are untouched), and --sigmas/--renoise still win."""
    from distill.export import export
    write_run(tmp_path, OviFusion.from_variant("tiny", seed=11).state_dict(),
              {"student_sigmas": [1.0, 0.75, 0.5, 0.25], "renoise": "implied"})
    path = export(tmp_path / "run", tmp_path / "student.safetensors")
    source = resolve_model(parse_args(["--student", str(path), "--variant", "tiny", "--prompts", "p", "--out", "o"]))
    assert (source.weights, source.sigmas, source.renoise) == ("safetensors", (1.0, 0.75, 0.5, 0.25), "implied")
    cfg = parse_args(["--student", str(path), "--variant", "tiny", "--prompts", "p", "--out", "o", "--renoise", "fresh"])
    assert cfg.renoise == "fresh"


def run_main(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_missing_student_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    code, err = run_main(capsys, ["--student", str(missing), "--variant", "tiny", "--prompts",
                                  str(write_prompts(tmp_path)), "--out", str(tmp_path / "out")])
    assert code == EXIT_USAGE
    assert str(missing) in err and "no such file" in err
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_empty_prompts_file_is_named(tmp_path, capsys, student):
    prompts = write_prompts(tmp_path, "\n   \n")
    code, err = run_main(capsys, ["--student", str(student), "--variant", "tiny", "--prompts", str(prompts),
                                  "--out", str(tmp_path / "out")])
    assert code == EXIT_USAGE
    assert str(prompts) in err and "no prompts" in err


@pytest.mark.parametrize("args, needle", [
    (["--image", "{tmp}/a.ppm", "--image", "{tmp}/a.ppm", "--image", "{tmp}/a.ppm"], "--image given 3 times for 2 prompts"),
    (["--image", "{tmp}/missing.png"], "missing.png: no such file"),
    (["--steps", "3"], "--steps is for --teacher"),
    (["--sigmas", "0.5,0.9"], "strictly decreasing"),
])
def test_bad_arguments_stop_before_any_model(tmp_path, capsys, student, args, needle):
    write_ppm(tmp_path / "a.ppm", 16, 16)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, err = run_main(capsys, ["--student", str(student), "--variant", "tiny", "--prompts",
                                  str(write_prompts(tmp_path)), "--out", str(tmp_path / "out"), *args])
    assert code == EXIT_USAGE
    assert needle in err


def test_real_variant_needs_encoder_files(tmp_path, capsys, student):
    args = ["--student", str(student), "--variant", "720x720_5s", "--prompts", str(write_prompts(tmp_path)),
            "--out", str(tmp_path / "out")]
    code, err = run_main(capsys, args)
    assert code == EXIT_USAGE
    assert "needs the real encoder files" in err

    code, err = run_main(capsys, [*args, "--encoders", str(tmp_path / "ckpts")])
    assert code == EXIT_USAGE
    for missing in ("Wan2.2_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl", "v1-16.pth", "best_netG.pt"):
        assert f"{missing} does not exist" in err


def test_pixels_and_samples_for_the_container(tmp_path):
    from distill.media_out import audio_to_float, video_to_uint8, write_mp4

    video = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.7]).view(1, 5, 1, 1).expand(3, 5, 1, 1)
    assert video_to_uint8(video)[:, 0, 0, 0].tolist() == [0, 64, 128, 255, 255]  # (x+1)/2·255, rounded, clamped
    assert audio_to_float(torch.tensor([[-2.0, 0.25, 3.0]])).tolist() == [-1.0, 0.25, 1.0]
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros((3, 63, 64, 3), np.uint8), np.zeros(512, np.float32))
    assert not list(tmp_path.iterdir())
