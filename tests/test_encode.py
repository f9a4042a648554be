"""precompute/encode.py end to end: real clips (good and bad) through the real DeepSpeed launcher
on 2 CPU ranks with the tiny encoders, then a rerun; plus fast checks of the manifest reader and
of the errors that must stop a run before any clip is read."""
import json
import math
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.torch
import torch
import webdataset as wds

from precompute.encode import (
    EXIT_ROWS_FAILED, EXIT_USAGE, BadRow, FailureLog, ManifestError, ManifestRow, encode_clip, parse_args, plan_rank,
    read_manifest, run,
)
from precompute.encoders.bundle import EncoderBundle
from precompute.media import decode_clip
from precompute.shards import (
    SCHEMA_VERSION, read_dataset_info, read_failures, read_index, read_negatives, iter_shard, sample_key,
)
from precompute.variants import get_variant, snap_to_area
from tests import clips
from tests.launcher import REPO, run_deepspeed

TINY = get_variant("tiny")
SCRIPT = REPO / "precompute" / "encode.py"
CLICK_AT = 0.4  # 6,400 samples after t0 = 0: the middle of audio latent 12

# name -> make_clip kwargs; together they cover mp4/mkv, 16/22.05/44.1/48 kHz, mono/stereo,
# 24/25/30 fps and sizes that are not the bucket's.
GOOD = {
    "click.mp4": dict(fps=24, width=64, height=48, audio_rate=16_000, channels=1, click_at=CLICK_AT),
    "noclick.mp4": dict(fps=24, width=64, height=48, audio_rate=16_000, channels=1),
    "stereo25.mkv": dict(fps=25, width=100, height=70, audio_rate=22_050, channels=2, container="mkv"),
    "rate44.mp4": dict(fps=30, width=70, height=100, audio_rate=44_100, channels=2),
    "rate48.mkv": dict(fps=30, width=160, height=90, audio_rate=48_000, channels=1, container="mkv"),
    "odd24.mp4": dict(fps=24, width=90, height=58, audio_rate=44_100, channels=1),
}
GOOD_START = {"stereo25.mkv": 0.1, "rate44.mp4": 0.2}


def _csv_field(value: str) -> str:
    return '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value


def make_inputs(root: Path) -> tuple[Path, dict[str, str]]:
    """Clips and a csv manifest (bytes, so one row can carry non-UTF-8). Returns the manifest and
    the reason expected for each bad row, by row number."""
    media = root / "media"
    media.mkdir()
    for name, kwargs in GOOD.items():
        clips.make_clip(media / name, seconds=1.0, seed=1, **kwargs)
    small = dict(seconds=1.0, fps=24, width=64, height=64)
    clips.make_silent_track_missing(media / "noaudio.mp4", **small)
    clips.make_too_short(media / "short.mp4", fps=24, width=64, height=64)
    clips.make_truncated(media / "truncated.mp4", **small)
    clips.make_empty(media / "empty.mp4")
    clips.make_random_bytes(media / "random.mp4")

    rows: list[bytes] = [b"video,prompt,start,end"]
    for name in GOOD:
        start = GOOD_START.get(name)
        prompt = f"A clip called {name}, with rain. <AUDCAP>soft rain, a click<ENDAUDCAP>"
        rows.append(",".join([f"media/{name}", _csv_field(prompt), "" if start is None else str(start), ""]).encode())
    bad = [  # (csv row, expected reason)
        (b"media/noaudio.mp4,a dog,,", "no_audio"),
        (b"media/short.mp4,a cat,,", "too_short"),
        (b"media/truncated.mp4,a car,,", "unreadable"),
        (b"media/empty.mp4,a bird,,", "unreadable"),
        (b"media/random.mp4,a tree,,", "unreadable"),
        (b"media/does_not_exist.mp4,a house,,", "missing"),
        (b"media/odd24.mp4,   ,0.05,", "bad_row"),                # empty prompt
        (b"media/odd24.mp4,caf\xe9 in latin-1,0.05,", "bad_row"),  # not UTF-8
        (b"media/odd24.mp4,a window,soon,", "bad_row"),            # start is not a number
        (b"media/odd24.mp4,past the end,0.5,", "too_short"),       # 0.5 + 0.708 s > 1 s
        (b"media/click.mp4,the same clip again,0,", "duplicate"),  # same key as row 0
    ]
    expected: dict[int, str] = {}
    for line, reason in bad:
        expected[len(rows) - 1] = reason
        rows.append(line)
    manifest = root / "manifest.csv"
    manifest.write_bytes(b"\n".join(rows) + b"\n")
    return manifest, expected


def launch(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """encode.py exits 1 when rows failed: the exit status is the test's to check."""
    return run_deepspeed(SCRIPT, *args, nproc=nproc, check=False)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in (root / "shards").iterdir()}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    manifest, expected = make_inputs(root)
    out = root / "dataset"
    args = ("--manifest", str(manifest), "--shards", str(out), "--variant", "tiny", "--decode-workers", "1",
            "--samples-per-shard", "2", "--text-batch", "3", "--decode-timeout", "60")
    first = launch(*args)
    before = snapshot(out) if (out / "shards").exists() else {}
    second = launch(*args)
    return dict(root=root, manifest=manifest, out=out, expected=expected, first=first, second=second,
                before=before, after=snapshot(out) if (out / "shards").exists() else {})


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def good_keys() -> dict[str, str]:
    return {sample_key(f"media/{name}", GOOD_START.get(name) or 0.0, "tiny"): name for name in GOOD}


def read_samples(out: Path) -> dict[str, list]:
    by_key: dict[str, list] = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        for sample in iter_shard(shard):
            by_key.setdefault(sample.key, []).append((shard.name, sample))
    return by_key


def test_run_exits_1_and_says_how_many_failed(encoded):
    first = encoded["first"]
    assert first.returncode == EXIT_ROWS_FAILED, _explain(first)
    n_bad = len(encoded["expected"])
    assert f"6 written, 0 skipped (already done), {n_bad} failed" in first.stdout, _explain(first)


def test_every_good_clip_is_in_exactly_one_shard_and_the_index(encoded):
    out = encoded["out"]
    samples = read_samples(out)
    assert set(samples) == set(good_keys())
    assert all(len(where) == 1 for where in samples.values()), {k: [s for s, _ in v] for k, v in samples.items()}
    # both ranks took a share; 2 samples per shard at most
    assert {name.split("-")[0] for where in samples.values() for name, _ in where} == {"0", "1"}
    index = {row.key: row for row in read_index(out / "index.parquet")}
    assert set(index) == set(samples)
    for key, [(shard, sample)] in samples.items():
        assert index[key].shard == f"shards/{shard}"
        assert index[key].video_shape == tuple(sample.video_latent.shape)
        assert index[key].source == f"media/{good_keys()[key]}"
    info = read_dataset_info(out / "dataset.json")
    assert info.variant == "tiny" and info.schema_version == SCHEMA_VERSION and info.video_latent_normalised
    assert info.counts == {"samples": 6, "shards": len({s for v in samples.values() for s, _ in v}),
                           "failures": len(encoded["expected"])}
    assert set(info.encoders) == {"wan_vae", "mmaudio_vae", "t5", "tokenizer"}
    negatives = read_negatives(out / "negatives.safetensors")
    assert negatives.video_prompt == "jitter, bad hands, blur, distortion"
    assert negatives.video_emb.shape[1] == 32 and negatives.audio_emb.shape[0] == negatives.audio_ids.shape[0]


def test_a_rank_encodes_its_rows_in_key_order_not_manifest_order(tmp_path):
    """Clips of one source sit next to each other in a manifest; in key (hash) order they spread
    over the shards, so the trainer's shard-by-shard reader gets mixed batches."""
    rows = [ManifestRow(row=i, video=tmp_path / "long.mp4", source_id="long.mp4", prompt="p", image=None,
                        start=5.0 * i, end=5.0 * i + 5, key=sample_key("long.mp4", 5.0 * i, "tiny"), raw={})
            for i in range(40)]
    todo, skipped = plan_rank(rows, rank=0, world=1, done_keys={rows[3].key}, failures=FailureLog(tmp_path, 0))
    assert skipped == 1 and len(todo) == 39
    assert [r.key for r in todo] == sorted(r.key for r in rows if r.row != 3)
    assert [r.row for r in todo] != sorted(r.row for r in todo)


def test_every_bad_row_is_in_failures_with_its_reason(encoded):
    records = read_failures(encoded["out"] / "failures.jsonl")
    got = {r.row: r for r in records}
    assert len(records) == len(got), "a row was recorded twice"
    assert {row: r.reason for row, r in got.items()} == encoded["expected"]
    for record in records:
        assert record.error and record.manifest_row  # the exception text and the row as read
    latin1 = next(r for r in records if "latin" in str(r.manifest_row.get("prompt")))
    assert latin1.manifest_row["prompt"] == "caf\\xe9 in latin-1" and "UTF-8" in latin1.error
    assert "start" in next(r for r in records if r.manifest_row.get("start") == "soon").error
    # each rank wrote its own part; both were merged
    assert sorted(p.name for p in (encoded["out"] / "failures").iterdir()) == ["0.jsonl", "1.jsonl"]


def test_rerun_writes_nothing_new(encoded):
    second = encoded["second"]
    assert second.returncode == EXIT_ROWS_FAILED, _explain(second)
    assert f"0 written, 6 skipped (already done), {len(encoded['expected'])} failed" in second.stdout, _explain(second)
    assert encoded["after"] == encoded["before"]
    assert len(read_failures(encoded["out"] / "failures.jsonl")) == len(encoded["expected"])


def test_frames_audio_and_text_have_the_variant_shapes_and_timing(encoded):
    for key, [(_, sample)] in read_samples(encoded["out"]).items():
        name = good_keys()[key]
        kwargs, t0 = GOOD[name], GOOD_START.get(name, 0.0)
        bucket = snap_to_area(kwargs["height"], kwargs["width"], TINY.area)
        assert tuple(sample.video_latent.shape) == (48, TINY.latent_frames, bucket[0] // 16, bucket[1] // 16)
        assert tuple(sample.audio_latent.shape) == (TINY.audio_latents, 20)
        assert sample.meta.t0 == pytest.approx(t0) and sample.meta.t1 == pytest.approx(t0 + TINY.frames / 24)
        assert sample.meta.extra["audio_rate_in"] == kwargs["audio_rate"]
        # frames picked by timestamp: the source frame displayed at t0 + k/24
        fps = kwargs["fps"]
        expected = [math.floor((t0 + k / 24) * fps + 1e-6) / fps for k in range(TINY.frames)]
        assert sample.meta.extra["frame_times"] == pytest.approx(expected, abs=2e-3)
        assert sample.text_ids[-1] == 1 and sample.text_emb.shape == (sample.text_ids.shape[0], 32)
        assert "<AUDCAP>soft rain, a click<ENDAUDCAP>" in sample.meta.prompt


def test_a_click_lands_in_its_audio_latent_frame(encoded):
    samples = {good_keys()[k]: v[0][1] for k, v in read_samples(encoded["out"]).items()}
    diff = (samples["click.mp4"].audio_latent.float() - samples["noclick.mp4"].audio_latent.float()).norm(dim=1)
    assert int(diff.argmax()) == int(CLICK_AT * 16_000) // 512  # latent 12
    assert torch.equal(samples["click.mp4"].video_latent, samples["noclick.mp4"].video_latent)


def test_shards_read_back_with_webdataset_to_the_tensors_encode_clip_makes(encoded, tmp_path):
    torch.set_num_threads(1)  # as the launched ranks (OMP_NUM_THREADS=1)
    out = encoded["out"]
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    stored = {s["__key__"]: safetensors.torch.load(s["latents.safetensors"]) | {"json": json.loads(s["json"])}
              for s in wds.WebDataset(urls, shardshuffle=False)}
    bundle = EncoderBundle.load(TINY, None, "cpu", torch.float32, cache_dir=tmp_path)
    rows: dict[str, ManifestRow] = {}
    for entry in read_manifest(encoded["manifest"], TINY):
        if isinstance(entry, ManifestRow):
            rows.setdefault(entry.key, entry)  # the first of the duplicates is the one encoded
    for name in ("click.mp4", "stereo25.mkv"):
        key = next(k for k, n in good_keys().items() if n == name)
        row = rows[key]
        clip = decode_clip(row.video, TINY, row.start, row.end)
        text = bundle.text.encode_with_ids([row.prompt])
        sample = encode_clip(bundle, TINY, row, clip, text.contexts[0], text.text_ids[0])
        # text_emb too: the launch ran umT5 on a padded batch of prompts, here on one (spec/data.md
        # §2.2: padding does not change the real rows)
        for tensor in ("video_latent", "audio_latent", "text_emb", "text_ids"):
            assert torch.equal(stored[key][tensor], getattr(sample, tensor)), (name, tensor)
        assert stored[key]["json"]["prompt"] == row.prompt


# Fast, single process ---------------------------------------------------------------------------

def test_manifest_formats_agree_and_bad_rows_never_raise(tmp_path):
    (tmp_path / "sub").mkdir()
    records = [{"video": "sub/a.mp4", "prompt": "a dog Audio: barking", "start": 1.5},
               {"video": "b.mp4", "prompt": "", "start": None},
               {"video": "c.mp4", "prompt": "x", "start": -2},
               {"prompt": "no video"}]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(json.dumps(r).encode() for r in records)
                                       + b"\n{broken json\n\"a string\"\n" + b'{"video": "d.mp4", "prompt": "\xff"}\n')
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("video,prompt,start\nsub/a.mp4,a dog Audio: barking,1.5\nb.mp4,,\nc.mp4,x,-2\n,no video,\n")
    parsed = {fmt: read_manifest(tmp_path / f"m.{fmt}", TINY) for fmt in ("jsonl", "parquet", "csv")}
    for fmt, entries in parsed.items():
        good = entries[0]
        assert isinstance(good, ManifestRow), (fmt, good)
        assert good.video == tmp_path / "sub" / "a.mp4" and good.source_id == "sub/a.mp4" and good.start == 1.5
        assert good.prompt == "a dog <AUDCAP>barking<ENDAUDCAP>"  # tiny is an Ovi 1.0 (audcap) variant
        assert good.key == sample_key("sub/a.mp4", 1.5, "tiny")
        assert [type(e) for e in entries[1:4]] == [BadRow] * 3, fmt
        assert "prompt" in entries[1].error and "start" in entries[2].error and "video" in entries[3].error
    jsonl = parsed["jsonl"]
    assert [e.row for e in jsonl] == [0, 1, 2, 3, 4, 5, 6]
    assert all(isinstance(e, BadRow) for e in jsonl[4:]) and "UTF-8" in jsonl[6].error
    (tmp_path / "nocol.csv").write_text("path,prompt\na.mp4,x\n")
    with pytest.raises(ManifestError, match="nocol.csv.*'video'"):
        read_manifest(tmp_path / "nocol.csv", TINY)


def test_bad_command_line_or_encoder_file_stops_before_any_clip(tmp_path, capsys):
    fifo = clips.make_fifo(tmp_path / "hang.mp4")  # reading it would block forever
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"video,prompt\n{fifo.name},a prompt\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        parse_args(["--manifest", str(manifest), "--shards", str(out), "--variant", "nope"])
    assert exited.value.code == EXIT_USAGE and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--manifest", str(tmp_path / "absent.csv"), "--shards", str(out), "--variant", "tiny"])
    assert "absent.csv" in capsys.readouterr().err

    base = ["--manifest", str(manifest), "--shards", str(out), "--variant", "tiny"]
    (tmp_path / "tok").mkdir()
    garbage = clips.make_random_bytes(tmp_path / "Wan2.2_VAE.pth")
    for extra, named in (
        (["--wan-vae", str(tmp_path / "missing.pth")], "missing.pth"),
        (["--wan-vae", str(garbage), "--mmaudio-vae", str(garbage), "--t5", str(garbage),
          "--tokenizer", str(tmp_path / "tok")], "Wan2.2_VAE.pth"),
    ):
        assert run(parse_args(base + extra)) == EXIT_USAGE
        assert named in capsys.readouterr().err
    assert run(parse_args(["--manifest", str(manifest), "--shards", str(out), "--variant", "720x720_5s"])) == EXIT_USAGE
    assert "needs the real encoder files" in capsys.readouterr().err
    assert not (out / "shards").exists() and not (out / "failures").exists()
