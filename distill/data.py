"""Precompute shards -> an endless, exactly resumable stream of single-bucket training batches.

Why not ``wds.WebDataset(resampled=True)``: its ResampledShards is seeded from the pid, the
clock and os.urandom (spec/data.md §5.3), so neither a restart nor a resume reproduces the
stream. Here every random choice is a pure function of (seed, epoch / counter), and the position
is a small ``DataState``: after ``load_state_dict`` the loader yields exactly the batches the
uninterrupted loader would have yielded.

The stream of one rank:

1. Epoch e permutes the dataset's shards (from index.parquet) with (seed, e); every rank
   computes the same permutation. Shard i of it goes to rank ``i % world_size``. When there
   are fewer shards than ranks, every rank reads every shard and keeps sample j of shard i when
   ``(i + j) % world_size == rank`` (sample-level striding), so ranks still never overlap.
2. Samples are read with WebDataset's tar reader and validated by ``precompute.shards``.
   A corrupt sample, a truncated shard or a shard that cannot be opened is logged (naming the
   shard and, for a sample, its key), counted in ``counters`` and skipped. Only a rank that
   takes no new sample for several epochs in a row stops, with an error: looping forever
   without data would hang the other ranks instead.
3. A small shuffle buffer (seeded draws) mixes neighbouring samples (precompute writes each
   rank's clips in key order, a hash, so neighbours in a shard are already unrelated clips); then
   each sample joins the pending list of its bucket (its tensor shapes) and a batch is emitted
   when a list reaches ``batch_size``. Shards hold one bucket each (ShardWriter), so lists fill
   quickly. The shuffle buffer drains at each epoch's end; a sample still waiting in a bucket list
   from the previous epoch is not taken again, so no batch repeats a clip.
4. Whether a batch is image-to-video is drawn from (seed, batch number), the same on every
   rank: under ZeRO-3 all ranks must run the same code path at each step.

The position saves the held samples (shuffle buffer, pending lists) by (shard, key), not their
tensors: saving is a few hundred bytes, and restoring re-reads those samples from their shards
once (a resume-time cost of at most a few shard reads).

No DataLoader workers, no prefetch thread: a sample costs one sequential read and a
safetensors parse (milliseconds against a DMD step of seconds), and a single reader keeps the
position trivially exact. A prefetcher can be added on top later by carrying ``state_dict()``
alongside each prefetched batch.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds

from distill.batch import Batch
from distill.dmd import pair_guidance
from precompute.shards import (
    DatasetInfo,
    Negatives,
    Sample,
    SampleError,
    decode_sample,
    read_dataset_info,
    read_index,
    read_negatives,
)
from precompute.variants import get_variant

if TYPE_CHECKING:
    from distill.config import TrainConfig

log = logging.getLogger(__name__)

DATASET_JSON, INDEX_PARQUET, NEGATIVES = "dataset.json", "index.parquet", "negatives.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STATE_VERSION = 1
MAX_EMPTY_EPOCHS = 3  # consecutive epochs without one new usable sample before a rank gives up
MAX_MESSAGES = 100


class DataError(ValueError):
    """The dataset does not fit the config (or a resume state), named by file, field or key."""


# Config ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    root: str                      # the precompute output directory
    batch_size: int = 1            # per rank
    text_len: int | None = None    # rows the DiT pads text to; None: the dataset variant's (512 for Ovi)
    seed: int = 0
    i2v_ratio: float = 0.5         # fraction of batches that carry the frame-0 image condition
    shuffle_buffer: int = 16       # samples; 0 or 1 keeps the shard order
    dtype: str = "bfloat16"        # of every float tensor in a Batch

    def validate(self) -> DataConfig:
        checks = [
            (self.batch_size >= 1, "batch_size", "must be >= 1"),
            (self.text_len is None or self.text_len >= 1, "text_len", "must be >= 1 (or None)"),
            (self.seed >= 0, "seed", "must be >= 0"),
            (0.0 <= self.i2v_ratio <= 1.0, "i2v_ratio", "must be in [0, 1]"),
            (self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0"),
            (self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise DataError(f"DataConfig.{name}: {why}, got {getattr(self, name)!r}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# The dataset files -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Dataset:
    root: Path
    info: DatasetInfo
    shards: tuple[str, ...]            # relative to root, sorted
    longest_text: tuple[int, str]      # (n_tokens, key) of the longest prompt in the index
    negatives: Negatives

    @property
    def fingerprint(self) -> str:
        """Identifies the shard list; a resume state is only valid for the same one."""
        return hashlib.sha1("\n".join(self.shards).encode("utf-8")).hexdigest()[:16]


def open_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {root}")
    for name in (DATASET_JSON, INDEX_PARQUET, NEGATIVES):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name}: missing; is {root} a finished precompute output?")
    info = read_dataset_info(root / DATASET_JSON)  # refuses another schema_version, naming the file
    rows = read_index(root / INDEX_PARQUET)
    if not rows:
        raise DataError(f"{root / INDEX_PARQUET}: lists no samples")
    longest = max((row.n_tokens, row.key) for row in rows)
    return Dataset(root, info, tuple(sorted({row.shard for row in rows})), longest, read_negatives(root / NEGATIVES))


# Position --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeldSample:
    shard: str
    key: str


@dataclass
class DataState:
    epoch: int = 0
    shard_cursor: int = 0        # index into this rank's shard list of the epoch
    sample_offset: int = 0       # tar samples of that shard consumed (usable, corrupt, or another rank's)
    epoch_samples: int = 0       # new usable samples this rank took in this epoch
    empty_epochs: int = 0        # consecutive finished epochs with none
    batches: int = 0             # batches emitted; batch n's i2v draw depends on (seed, n) only
    draws: int = 0               # shuffle-buffer draws made
    shuffle: list[HeldSample] = field(default_factory=list)
    pending: dict[str, list[HeldSample]] = field(default_factory=dict)  # bucket id -> samples waiting

    def held(self) -> list[HeldSample]:
        return self.shuffle + [ref for group in self.pending.values() for ref in group]

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["shuffle"] = [[r.shard, r.key] for r in self.shuffle]
        raw["pending"] = {b: [[r.shard, r.key] for r in group] for b, group in self.pending.items()}
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataState:
        counters = {f.name: int(raw[f.name]) for f in dataclasses.fields(cls) if f.name not in ("shuffle", "pending")}
        return cls(**counters, shuffle=[HeldSample(*r) for r in raw["shuffle"]],
                   pending={b: [HeldSample(*r) for r in group] for b, group in raw["pending"].items()})


@dataclass
class DataCounters:
    """What was skipped instead of crashing; for the training log. Not part of the position."""
    samples: int = 0            # usable samples read
    corrupt_samples: int = 0    # failed the schema (unreadable safetensors, bad JSON, shapes, NaN ...)
    shard_errors: int = 0       # a shard that could not be opened, or broke off (truncated, bad tar)
    messages: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        log.warning("%s", message)
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(message)


# Pure pieces -----------------------------------------------------------------------------------

def _uniform(*parts: object) -> float:
    """A uniform draw in [0, 1) that depends only on ``parts`` (str seeds are hashed with sha512,
    so this is the same in every process and Python run)."""
    return random.Random(":".join(map(str, parts))).random()


@dataclass(frozen=True)
class EpochPlan:
    shards: tuple[str, ...]   # what this rank reads this epoch, in order
    stride: int               # 1: whole shards; world_size: sample-level striding
    rank: int

    def owns(self, cursor: int, offset: int) -> bool:
        return self.stride == 1 or (cursor + offset) % self.stride == self.rank


def plan_epoch(shards: tuple[str, ...], seed: int, epoch: int, rank: int, world_size: int) -> EpochPlan:
    order = list(shards)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    if len(order) >= world_size:
        return EpochPlan(tuple(order[rank::world_size]), 1, rank)
    return EpochPlan(tuple(order), world_size, rank)


def bucket_id(sample: Sample) -> str:
    return "x".join(map(str, sample.shape_key))


def pad_text(emb: torch.Tensor, text_len: int, what: str) -> torch.Tensor:
    """[n, D] -> [text_len, D], zero rows after the prompt, as Ovi's DiT sees it. Longer than
    text_len means the dataset and the config disagree: never truncate silently."""
    n = emb.shape[0]
    if n > text_len:
        raise DataError(f"{what}: {n} text tokens > text_len {text_len}; the dataset was encoded for a "
                        f"longer context than this config pads to")
    return torch.cat([emb, emb.new_zeros(text_len - n, emb.shape[1])]) if n < text_len else emb


def normalise_video(video: torch.Tensor, info: DatasetInfo, dtype: torch.dtype) -> torch.Tensor:
    """Batch.video is what the DiT sees: Wan2.2 latents as (mu - mean) / std."""
    if info.video_latent_normalised:
        return video.to(dtype)
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(info.video_latent_mean, dtype=torch.float32).view(shape)
    std = torch.tensor(info.video_latent_std, dtype=torch.float32).view(shape)
    return ((video.float() - mean) / std).to(dtype)


PAIR = "pair"  # SampleMeta.extra key of a teacher pair (distill/pairs.py): noise seed, mode, sampler settings


def pair_noise(seed: int, video_shape: tuple[int, ...], audio_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair's starting noise, float32, drawn on the CPU from its seed (the same on every machine)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(video_shape, generator=g), torch.randn(audio_shape, generator=g)


def _pair_tensors(samples: list[Sample], video: torch.Tensor, audio: torch.Tensor) -> dict[str, torch.Tensor]:
    """For teacher pairs: the starting noises and the teacher's samples (the batch's own latents)."""
    if not any(PAIR in s.meta.extra for s in samples):
        return {}
    missing = [s.key for s in samples if PAIR not in s.meta.extra]
    if missing:
        raise DataError(f"sample {missing[0]!r} has no '{PAIR}' entry in its json, beside teacher pairs in one batch")
    noise = [pair_noise(s.meta.extra[PAIR]["noise_seed"], tuple(s.video_latent.shape), tuple(s.audio_latent.shape))
             for s in samples]
    return {"noise_video": torch.stack([v for v, _ in noise]), "noise_audio": torch.stack([a for _, a in noise]),
            "target_video": video, "target_audio": audio}


def collate(samples: list[Sample], i2v: bool, negatives: tuple[torch.Tensor, torch.Tensor], text_len: int,
            info: DatasetInfo, dtype: torch.dtype) -> Batch:
    neg_video, neg_audio = negatives
    for s in samples:
        if s.text_emb.shape[1] != neg_video.shape[1]:
            raise DataError(f"sample {s.key!r}: text width {s.text_emb.shape[1]} != the negatives' {neg_video.shape[1]}")
    video = normalise_video(torch.stack([s.video_latent for s in samples]), info, dtype)
    audio = torch.stack([s.audio_latent for s in samples]).to(dtype)
    size = len(samples)
    return Batch(
        video=video,
        audio=audio,
        text=torch.stack([pad_text(s.text_emb, text_len, f"sample {s.key!r}") for s in samples]).to(dtype),
        neg_text_video=neg_video.expand(size, -1, -1),
        neg_text_audio=neg_audio.expand(size, -1, -1),
        # The causal VAE makes latent frame 0 depend on pixel frame 0 alone: it IS the i2v condition.
        image_latent=video[:, :, :1].clone() if i2v else None,
        keys=tuple(s.key for s in samples),
        **_pair_tensors(samples, video, audio),
    )


# The stream ------------------------------------------------------------------------------------

class ShardBatches(Iterator[Batch]):
    """Endless single-bucket batches for one rank; ``state_dict`` / ``load_state_dict`` give an
    exact resume (same rank, world size, config and shard list)."""

    def __init__(self, config: DataConfig, rank: int = 0, world_size: int = 1):
        self.config = config.validate()
        if not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.dataset = open_dataset(config.root)
        self.text_len = config.text_len or get_variant(self.dataset.info.variant).text_len
        n_tokens, key = self.dataset.longest_text
        if n_tokens > self.text_len:
            raise DataError(f"{self.dataset.root / INDEX_PARQUET}: sample {key!r} has {n_tokens} text tokens > "
                            f"DataConfig.text_len {self.text_len}")
        negatives = self.dataset.negatives
        dtype = config.torch_dtype
        self._negatives = (pad_text(negatives.video_emb, self.text_len, f"{self.dataset.root / NEGATIVES} video").to(dtype),
                           pad_text(negatives.audio_emb, self.text_len, f"{self.dataset.root / NEGATIVES} audio").to(dtype))
        self.counters = DataCounters()
        self.state = DataState()
        self._tensors: dict[HeldSample, Sample] = {}
        self._reader: Iterator[dict[str, Any]] | None = None
        self._plan: EpochPlan | None = None

    # -- position --
    def _layout(self) -> dict[str, Any]:
        c = self.config
        return {"rank": self.rank, "world_size": self.world_size, "seed": c.seed, "batch_size": c.batch_size,
                "shuffle_buffer": c.shuffle_buffer, "i2v_ratio": c.i2v_ratio, "shards": self.dataset.fingerprint}

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch returned: plain Python values (JSON-serialisable)."""
        return {"version": STATE_VERSION, "layout": self._layout(), "state": self.state.to_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved.get("version") != STATE_VERSION:
            raise DataError(f"data state version {saved.get('version')!r}, this code reads {STATE_VERSION}")
        ours = self._layout()
        for name, value in saved["layout"].items():
            if ours.get(name) != value:
                raise DataError(f"cannot resume the data position exactly: {name} was {value!r}, now {ours.get(name)!r} "
                                f"(the position belongs to one rank, world size, data config and shard list)")
        state = DataState.from_dict(saved["state"])
        tensors = self._fetch(state.held())
        self._close_reader()
        self.state, self._tensors, self._plan = state, tensors, None

    def _fetch(self, refs: list[HeldSample]) -> dict[HeldSample, Sample]:
        """Re-read the samples a saved position holds (once per resume)."""
        wanted: dict[str, set[str]] = {}
        for ref in refs:
            wanted.setdefault(ref.shard, set()).add(ref.key)
        found: dict[HeldSample, Sample] = {}
        for shard, keys in wanted.items():
            reader = self._raw_samples(shard, lambda exn: True)
            for raw in reader:
                if raw.get("__key__") not in keys:
                    continue
                keys.discard(raw["__key__"])
                try:
                    found[HeldSample(shard, raw["__key__"])] = decode_sample(raw)
                except SampleError as exc:
                    raise DataError(f"cannot resume: a held sample no longer decodes: {exc}") from None
                if not keys:
                    break
            reader.close()
        missing = [ref for ref in refs if ref not in found]
        if missing:
            raise DataError(f"cannot resume: {missing[0].shard} no longer holds sample {missing[0].key!r}")
        return found

    # -- reading --
    def _raw_samples(self, shard: str, handler) -> Iterator[dict[str, Any]]:
        return wds.tarfile_to_samples(handler=handler)([{"url": str(self.dataset.root / shard)}])

    def _on_shard_error(self, shard: str, exn: BaseException) -> bool:
        self.counters.shard_errors += 1
        self.counters.note(f"{shard}: skipping unreadable shard data: {type(exn).__name__}: {exn}")
        return True

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _epoch_plan(self) -> EpochPlan:
        if self._plan is None:
            self._plan = plan_epoch(self.dataset.shards, self.config.seed, self.state.epoch, self.rank, self.world_size)
        return self._plan

    def _end_epoch(self) -> None:
        state = self.state
        state.empty_epochs = 0 if state.epoch_samples else state.empty_epochs + 1
        if state.empty_epochs >= MAX_EMPTY_EPOCHS:
            raise DataError(f"rank {self.rank}/{self.world_size} took no new sample in {state.empty_epochs} epochs of "
                            f"{self.dataset.root}: nothing readable ({self.counters.messages[-3:]}), or every "
                            f"bucket has fewer samples than batch_size {self.config.batch_size} on this rank")
        state.epoch, state.shard_cursor, state.sample_offset, state.epoch_samples = state.epoch + 1, 0, 0, 0
        self._plan = None

    def _read_next(self) -> HeldSample | None:
        """The next new usable sample of this rank's epoch (its tensors kept in ``_tensors``),
        or None once the epoch is read to its end."""
        state = self.state
        plan = self._epoch_plan()
        while state.shard_cursor < len(plan.shards):
            shard = plan.shards[state.shard_cursor]
            if self._reader is None:
                self._reader = self._raw_samples(shard, functools.partial(self._on_shard_error, shard))
                for _ in range(state.sample_offset):  # resume mid-shard: skip without decoding
                    next(self._reader, None)
            raw = next(self._reader, None)
            if raw is None:
                self._close_reader()
                state.shard_cursor, state.sample_offset = state.shard_cursor + 1, 0
                continue
            offset = state.sample_offset
            state.sample_offset += 1
            if not plan.owns(state.shard_cursor, offset):
                continue
            ref = HeldSample(shard, str(raw.get("__key__")))
            if ref in self._tensors:
                # Still waiting in a bucket since the previous epoch (a rare bucket): holding
                # it twice could put one clip twice into a batch.
                continue
            try:
                sample = decode_sample(raw)
            except SampleError as exc:  # names the key and the shard
                self.counters.corrupt_samples += 1
                self.counters.note(f"skipping corrupt sample: {exc}")
                continue
            self.counters.samples += 1
            state.epoch_samples += 1
            self._tensors[ref] = sample
            return ref
        return None

    def _draw(self) -> HeldSample:
        state = self.state
        i = int(_uniform("shuffle", self.config.seed, self.rank, state.draws) * len(state.shuffle))
        state.draws += 1
        ref = state.shuffle[i]
        state.shuffle[i] = state.shuffle[-1]
        state.shuffle.pop()
        return ref

    def _next_ref(self) -> HeldSample:
        """The next sample for the bucket lists, through the shuffle buffer. The buffer drains at
        each epoch's end, so it never holds a sample that the next epoch reads again."""
        state = self.state
        while True:
            ref = self._read_next()
            if ref is None:
                if state.shuffle:
                    return self._draw()
                self._end_epoch()
                continue
            if self.config.shuffle_buffer <= 1:
                return ref
            state.shuffle.append(ref)
            if len(state.shuffle) >= self.config.shuffle_buffer:
                return self._draw()

    def _add_to_bucket(self, ref: HeldSample) -> list[HeldSample] | None:
        """The bucket's samples once it has batch_size of them (the list is then emptied)."""
        pending = self.state.pending
        bucket = bucket_id(self._tensors[ref])
        group = pending.setdefault(bucket, [])
        group.append(ref)
        if len(group) < self.config.batch_size:
            return None
        del pending[bucket]
        return group

    def __next__(self) -> Batch:
        while (group := self._add_to_bucket(self._next_ref())) is None:
            pass
        i2v = _uniform("i2v", self.config.seed, self.state.batches) < self.config.i2v_ratio
        self.state.batches += 1
        batch = collate([self._tensors[ref] for ref in group], i2v, self._negatives, self.text_len,
                        self.dataset.info, self.config.torch_dtype)
        for ref in group:
            del self._tensors[ref]
        return batch

    def __iter__(self) -> ShardBatches:
        return self


# What the trainer calls ------------------------------------------------------------------------

def check_dataset(root: str | Path, variant: str) -> Dataset:
    """Fail before any process group exists: the files, the schema, and the model variant the
    dataset was encoded for (latent shapes, audio length and prompt style all depend on it)."""
    dataset = open_dataset(root)
    if dataset.info.variant != variant:
        raise DataError(f"{dataset.root / DATASET_JSON}: encoded for variant {dataset.info.variant!r}, "
                        f"but model.variant is {variant!r}")
    n_tokens, key = dataset.longest_text
    text_len = get_variant(variant).text_len
    if n_tokens > text_len:
        raise DataError(f"{dataset.root / INDEX_PARQUET}: sample {key!r} has {n_tokens} text tokens > "
                        f"text_len {text_len} of variant {variant!r}")
    return dataset


def build_loader(root: str | Path, cfg: TrainConfig, rank: int, world_size: int, i2v_ratio: float | None = None
                 ) -> ShardBatches:
    data = cfg.data
    config = DataConfig(str(root), batch_size=data.batch_size, text_len=get_variant(cfg.model.variant).text_len,
                        seed=data.seed, i2v_ratio=data.i2v_ratio if i2v_ratio is None else i2v_ratio,
                        shuffle_buffer=data.shuffle_buffer)
    return ShardBatches(config, rank, world_size)


PAIR_MODES = ("t2v", "i2v")  # distill/pairs.py writes each mode to its own dataset directory


def check_pairs(root: str | Path, cfg: TrainConfig) -> dict[str, Dataset]:
    """The pairs directory fits the recipe: each mode a dataset of the model's variant, made with
    the guidance this run's DMD uses (else the regression pulls towards another teacher)."""
    root = Path(root)
    found = {mode: check_dataset(root / mode, cfg.model.variant) for mode in PAIR_MODES if (root / mode).is_dir()}
    if not found:
        raise DataError(f"{root}: no t2v/ or i2v/ pairs inside; write them with distill/pairs.py")
    wanted = pair_guidance(cfg.dmd)
    for mode, dataset in found.items():
        made = json.loads(dataset.info.encoders.get(PAIR, "{}"))
        for name, value in wanted.items():
            if made.get(name) != value:
                raise DataError(f"{dataset.root / DATASET_JSON}: pairs made with {name}={made.get(name)!r}, "
                                f"but this run's dmd.{name} is {value!r}")
    return found


class PairBatches:
    """The generator's batches under dmd.regression_weight: a batch of teacher pairs of the mode the
    data stream drew (t2v or i2v: the draw is the same on every rank); a mode without pairs keeps
    the data batch (and its step has no regression term)."""

    def __init__(self, root: str | Path, cfg: TrainConfig, rank: int, world_size: int):
        self.streams = {mode: build_loader(Path(root) / mode, cfg, rank, world_size, i2v_ratio=float(mode == "i2v"))
                        for mode in PAIR_MODES if (Path(root) / mode).is_dir()}

    def __call__(self, batch: Batch) -> Batch:
        stream = self.streams.get("i2v" if batch.i2v else "t2v")
        return batch if stream is None else next(stream)

    def state_dict(self) -> dict[str, Any]:
        return {mode: stream.state_dict() for mode, stream in self.streams.items()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if set(saved) != set(self.streams):
            raise DataError(f"the checkpoint's pair streams {sorted(saved)} differ from this run's {sorted(self.streams)}")
        for mode, stream in self.streams.items():
            stream.load_state_dict(saved[mode])
