"""Teacher pairs: the guided teacher's own samples, what the guided fine-tune learns (and the anchor
of DMD's optional regression term).

    torchrun --nproc-per-node 8 distill/pairs.py --config distill/configs/ovi_720_5s_guided.yaml --data DATA \\
        --out PAIRS --count 2048 [--batch-size 1] [key=value ...]        (or plain `python`: one rank)

For `count` samples of the dataset (the first by key, so any world size picks the same ones) it
draws a noise from the sample's key and runs the teacher as Ovi samples it (UniPC, 50 steps,
shift 5, the recipe's dmd.cfg_video / cfg_audio / slg_block) from that noise and the sample's
prompt; the result is written as a sample of the same schema (precompute/shards.py) whose latents
are the teacher's, with the noise seed and the sampler settings in its json (`extra.pair`).
distill/train.py with data.pairs=PAIRS then either fine-tunes the teacher on them (objective flow:
the guided samples' score, which DMD queries without CFG, dmd.guidance=samples), or starts the
generator's rollout from a pair's noise and pulls its sample towards the teacher's
(dmd.regression_weight). DMD against the CFG-combined score alone drifts past the guided teacher's
samples (bench/RESULTS.md, "Guided DMD").

Mode: a sample is an image-to-video pair (its frame 0, the image, conditions the teacher) with
probability data.i2v_ratio, drawn from its key; t2v and i2v pairs go to PAIRS/t2v and PAIRS/i2v,
each a dataset directory of its own, because a training batch is all one mode on every rank.

Each rank loads the whole teacher (bf16, no ZeRO: inference only), takes the samples whose key
hashes to it, and writes its own shards; a rerun skips pairs already in finished shards. Rank 0
writes each mode's index.parquet, negatives.safetensors and dataset.json at the end. Cost: 2 x 50
teacher forwards a pair (Ovi 720x720 5 s: ~43 s on one H200, bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # `torchrun distill/pairs.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from distill.config import ConfigError, TrainConfig, load_config
from distill.data import (DATASET_JSON, INDEX_PARQUET, NEGATIVES, PAIR, DataError, check_dataset, normalise_video,
                          pad_text, pair_noise)
from distill.dmd import pair_guidance
from precompute.shards import (Sample, ShardWriter, iter_shard, read_dataset_info, read_done_rows, read_index,
                               read_negatives, write_dataset_info, write_index)
from precompute.variants import get_variant

MODES = ("t2v", "i2v")


def pair_seed(key: str, seed: int) -> int:
    """The noise seed of a sample's pair: a pure function of its key and the run's seed."""
    return int.from_bytes(hashlib.sha256(f"pair|{seed}|{key}".encode()).digest()[:7], "little")


def pair_mode(key: str, seed: int, i2v_ratio: float) -> str:
    u = int.from_bytes(hashlib.sha256(f"mode|{seed}|{key}".encode()).digest()[:7], "little") / 2 ** 56
    return "i2v" if u < i2v_ratio else "t2v"


def rank_of(key: str, world: int) -> int:
    return int(key, 16) % world


def sampler_settings(cfg: TrainConfig, steps: int) -> dict:
    """What a pair was made with; the trainer refuses pairs whose guidance differs from its DMD's."""
    return {"steps": steps, **pair_guidance(cfg.dmd),
            "teacher": cfg.model.checkpoint or f"tiny init seed {cfg.model.init_seed}"}


@torch.no_grad()
def make_pairs(teacher, sources: list[Sample], mode: str, cfg: TrainConfig, negatives, info, steps: int,
               device: torch.device, dtype: torch.dtype) -> list[Sample]:
    """The teacher's samples for a batch of same-shape sources (one mode)."""
    from distill.sampling import TeacherSamplerConfig, sample_teacher
    text_len = negatives[0].shape[0]
    seeds = [pair_seed(s.key, cfg.seed) for s in sources]
    noise = [pair_noise(seed, tuple(s.video_latent.shape), tuple(s.audio_latent.shape)) for seed, s in zip(seeds, sources)]
    noise_video = torch.stack([v for v, _ in noise]).to(device, dtype)
    noise_audio = torch.stack([a for _, a in noise]).to(device, dtype)
    text = torch.stack([pad_text(s.text_emb, text_len, f"sample {s.key!r}") for s in sources]).to(device, dtype)
    n = len(sources)
    neg_video, neg_audio = (x.to(device, dtype).expand(n, -1, -1) for x in negatives)
    image = None
    if mode == "i2v":
        video = normalise_video(torch.stack([s.video_latent for s in sources]), info, torch.float32)
        image = video[:, :, :1].to(device, dtype)
    sampler = TeacherSamplerConfig(steps=steps, cfg_video=cfg.dmd.cfg_video, cfg_audio=cfg.dmd.cfg_audio,
                                   slg_block=cfg.dmd.slg_block)
    video, audio = sample_teacher(teacher, noise_video, noise_audio, text, neg_video, neg_audio, sampler, image)
    settings = sampler_settings(cfg, steps)
    return [dataclasses.replace(
        s, video_latent=v.to(torch.bfloat16).cpu(), audio_latent=a.to(torch.bfloat16).cpu(),
        meta=dataclasses.replace(s.meta, extra={**s.meta.extra, PAIR: {"noise_seed": seed, "mode": mode, **settings}}))
        for s, v, a, seed in zip(sources, video, audio, seeds)]


def planned(data: Path, count: int | None, seed: int, i2v_ratio: float, rank: int, world: int) -> dict[str, list]:
    """{mode: index rows} of this rank's share of the first `count` samples by key."""
    rows = sorted(read_index(data / INDEX_PARQUET), key=lambda r: r.key)[:count]
    mine = [r for r in rows if rank_of(r.key, world) == rank]
    return {mode: [r for r in mine if pair_mode(r.key, seed, i2v_ratio) == mode] for mode in MODES}


def sources_by_shard(data: Path, rows: list) -> Iterator[list[Sample]]:
    """The samples of `rows`, one shard at a time (each shard read once, in order)."""
    by_shard: dict[str, set[str]] = {}
    for r in rows:
        by_shard.setdefault(r.shard, set()).add(r.key)
    for shard, keys in sorted(by_shard.items()):
        found = [s for s in iter_shard(data / shard) if s.key in keys]
        if len(found) != len(keys):
            missing = sorted(keys - {s.key for s in found})
            raise DataError(f"{data / shard}: {len(missing)} sample(s) listed in index.parquet are not in it, e.g. {missing[0]}")
        yield found


def batches_of(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    """Same-shape batches of at most `size` (a shard holds one bucket, so usually one shape)."""
    by_shape: dict[tuple, list[Sample]] = {}
    for s in samples:
        by_shape.setdefault(s.shape_key, []).append(s)
    for group in by_shape.values():
        for i in range(0, len(group), size):
            yield group[i:i + size]


def finish(data: Path, out: Path, cfg: TrainConfig, steps: int) -> dict[str, int]:
    """Rank 0: each mode directory becomes a dataset the trainer's loader reads."""
    counts = {}
    info = read_dataset_info(data / DATASET_JSON)
    for mode in MODES:
        root = out / mode
        rows = read_done_rows(root) if (root / "shards").is_dir() else []
        if not rows:
            continue
        write_index(root / INDEX_PARQUET, rows)
        shutil.copyfile(data / NEGATIVES, root / NEGATIVES)
        encoders = {**info.encoders, PAIR: json.dumps({"mode": mode, "source": str(data), **sampler_settings(cfg, steps)},
                                                      sort_keys=True)}
        write_dataset_info(root / DATASET_JSON, dataclasses.replace(  # the teacher's latents are the DiT's: normalised
            info, video_latent_normalised=True, encoders=encoders,
            counts={"samples": len(rows), "shards": len({r.shard for r in rows})}))
        counts[mode] = len(rows)
    return counts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training recipe (model, dmd guidance, seed, data.i2v_ratio)")
    parser.add_argument("--data", required=True, type=Path, help="dataset directory written by precompute/encode.py")
    parser.add_argument("--out", required=True, type=Path, help="pairs directory (t2v/ and i2v/ inside)")
    parser.add_argument("--count", type=int, default=None, help="pairs to make (the first samples by key); default all")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per teacher call (same shapes only)")
    parser.add_argument("--steps", type=int, default=50, help="teacher solver steps (Ovi: 50)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. model.checkpoint=ckpts/Ovi/model.safetensors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.count is not None and args.count < 1:
            raise ConfigError(f"--count must be >= 1, got {args.count}")
        if args.batch_size < 1 or args.steps < 1:
            raise ConfigError("--batch-size and --steps must be >= 1")
        check_dataset(args.data, cfg.model.variant)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from distill.engines import replicated_teacher
    from precompute.distribution import init_distributed

    use_cuda = torch.cuda.is_available()
    dist = init_distributed(use_cuda)
    device = torch.device("cuda", dist.local_rank) if use_cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    teacher = replicated_teacher(cfg, {"bf16": {"enabled": dtype == torch.bfloat16}})
    info = read_dataset_info(args.data / DATASET_JSON)
    neg = read_negatives(args.data / NEGATIVES)
    text_len = get_variant(cfg.model.variant).text_len
    negatives = (pad_text(neg.video_emb, text_len, str(args.data / NEGATIVES)),
                 pad_text(neg.audio_emb, text_len, str(args.data / NEGATIVES)))
    plan = planned(args.data, args.count, cfg.seed, cfg.data.i2v_ratio, dist.rank, dist.world)
    t0, made = time.perf_counter(), 0
    for mode, rows in plan.items():
        if not rows:
            continue
        with ShardWriter(args.out / mode, rank=dist.rank) as writer:
            todo = [r for r in rows if r.key not in writer.done_keys]
            bar = tqdm(total=len(todo), disable=dist.rank != 0, desc=f"pairs {mode}", dynamic_ncols=True)
            for sources in sources_by_shard(args.data, todo):
                for batch in batches_of(sources, args.batch_size):
                    for pair in make_pairs(teacher, batch, mode, cfg, negatives, info, args.steps, device, dtype):
                        writer.write(pair)
                    made += len(batch)
                    bar.update(len(batch))
            bar.close()
    dist.barrier()
    if dist.rank == 0:
        counts = finish(args.data, args.out, cfg, args.steps)
        print(f"pairs: {counts} in {args.out} ({made} made by rank 0 in {time.perf_counter() - t0:.0f} s)", flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
