"""The three DeepSpeed ZeRO-3 engines of DMD, built in one place (the trainer only uses them):

    generator   trained, AdamW, activation checkpointing, fp32 EMA on its local shards
    fake_score  trained, AdamW, activation checkpointing
    teacher     frozen, ZeRO-3 without optimizer (parameter partitioning only), eval, no grads

All three start from the same weights: the official Ovi checkpoint, or the seeded `tiny` init.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param, set_z3_leaf_module, set_z3_leaf_modules

from .config import OptimConfig, TrainConfig
from .models import OviFusion, init_weights, variant_config
from .models.layers import FusedCrossAttention, SelfAttention, compile_elementwise_ops
from .models.loading import load_ovi_checkpoint, load_ovi_checkpoint_zero3, load_state_zero3
from .schedules import SCHEDULER_IN_DS_CONFIG
from .zero3_fetch import skip_single_rank_fetch_sync

FUSION_PARAM_MARKERS = ("k_fusion", "v_fusion", "pre_attn_norm_fusion", "norm_k_fusion")



def engine_configs(ds_config: dict, cfg: TrainConfig) -> dict[str, dict]:
    """Per-engine DeepSpeed configs derived from the user's ZeRO-3 JSON: each trained engine
    gets its own AdamW and clipping; the teacher gets no optimizer at all."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise ValueError(f"the DeepSpeed config must use zero_optimization.stage 3 (got {zero.get('stage')})")
    if "scheduler" in ds_config:  # train.load_ds_config refuses it earlier; this guards other callers
        raise ValueError(SCHEDULER_IN_DS_CONFIG)
    base = {k: v for k, v in ds_config.items() if k not in ("optimizer", "gradient_clipping")}
    base["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    base["gradient_accumulation_steps"] = 1
    base.pop("train_batch_size", None)
    adam_extra = ds_config.get("optimizer", {}).get("params", {})

    def trained(optim: OptimConfig) -> dict:
        out = copy.deepcopy(base)
        out["gradient_clipping"] = optim.grad_clip
        out["optimizer"] = {"type": "AdamW", "params": {
            **adam_extra, "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}}
        return out

    return {"generator": trained(cfg.generator_optim), "fake_score": trained(cfg.critic_optim), "teacher": copy.deepcopy(base)}


def peak_lrs(optim: OptimConfig) -> dict[str, float]:
    """The peak learning rate of each parameter group (the schedule multiplies these)."""
    return {"video": optim.lr * optim.lr_scale_video, "audio": optim.lr * optim.lr_scale_audio,
            "fusion": optim.lr * optim.lr_scale_fusion}


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """Video tower, audio tower and fusion parameters as separate groups with their own lr."""
    groups = {"video": [], "audio": [], "fusion": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "fusion" if any(m in name for m in FUSION_PARAM_MARKERS) else name.split("_model.")[0]
        groups[part].append(p)
    peak = peak_lrs(optim)
    return [{"params": ps, "lr": peak[part], "name": part} for part, ps in groups.items() if ps]


def set_learning_rates(optimizer, optim: OptimConfig, factor: float) -> None:
    """Every group at its peak lr times the schedule's factor (an optimizer's or a DeepSpeed engine's
    `.optimizer`: ZeRO-3 keeps the groups, their names included, on the wrapped torch optimizer)."""
    peak = peak_lrs(optim)
    for group in optimizer.param_groups:
        group["lr"] = peak[group["name"]] * factor


# ZeRO-3 fetch units: each attention module and each block's MLP is gathered in one piece instead
# of per Linear/norm (Ovi has ~35 parameter tensors per block; per-Linear fetches of ~32 MB run at
# a third of NVLink's bandwidth and leave the GPU idle between them: bench/RESULTS.md). The frozen
# teacher also fetches its embedding MLPs whole. Not for the trained engines' embeddings: DeepSpeed
# 0.19.8 releases a leaf module's parameters before the backward of an output used by several
# consumers (the time embedding feeds every block), seen on CPU. Blocks under activation
# checkpointing are fine: gradients are bit-identical with and without leaf modules
# (tests/distributed/trainer_checks.py).
TEACHER_LEAF_CLASSES = [SelfAttention, FusedCrossAttention, torch.nn.Sequential]


def set_fetch_units(model: OviFusion, trained: bool) -> None:
    if not trained:
        set_z3_leaf_modules(model, TEACHER_LEAF_CLASSES)
        return
    set_z3_leaf_modules(model, [SelfAttention, FusedCrossAttention])
    for tower in (model.video_model, model.audio_model):
        for block in tower.blocks:
            set_z3_leaf_module(block.ffn, True)


def _build_model(cfg: TrainConfig, ds_cfg: dict, trained: bool) -> OviFusion:
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        model = OviFusion(variant_config(cfg.model.variant, cfg.model.num_layers))
    if cfg.model.zero3_leaf_modules:
        set_fetch_units(model, trained)
    if cfg.model.random_init:
        return model
    if cfg.model.checkpoint:
        load_ovi_checkpoint_zero3(model, cfg.model.checkpoint)
    else:  # tiny: every rank builds the same seeded state; rank 0's copy is broadcast into the shards
        source = OviFusion(variant_config(cfg.model.variant, cfg.model.num_layers))
        source = init_weights(source, seed=cfg.model.init_seed).state_dict()
        load_state_zero3(model, source.__getitem__)
    return model


def replicated_teacher(cfg: TrainConfig, ds_cfg: dict) -> OviFusion:
    """The frozen teacher as a plain module, whole on every rank, in the engines' dtype."""
    dtype = torch.bfloat16 if ds_cfg.get("bf16", {}).get("enabled") else torch.float32
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model_cfg = variant_config(cfg.model.variant, cfg.model.num_layers)
    if cfg.model.random_init:
        with torch.device(device):
            model = OviFusion(model_cfg)
    elif cfg.model.checkpoint:
        with torch.device("meta"):
            model = OviFusion(model_cfg)
        load_ovi_checkpoint(model, cfg.model.checkpoint, dtype=dtype, device=str(device))
    else:
        model = init_weights(OviFusion(model_cfg), seed=cfg.model.init_seed)
    return model.to(device=device, dtype=dtype).requires_grad_(False).eval()


class FP32ShardEMA:
    """EMA of the generator kept in fp32 on each rank's own slice of the master weights.

    No communication: `safe_get_local_fp32_param` is a view of this rank's partition of the
    optimizer's fp32 weights. (Gathering parameters without modifier_rank and writing them,
    the common pattern, is silently discarded under ZeRO-3: spec/deepspeed.md §10 pitfall 1.)
    """

    def __init__(self, engine, decay: float, start_step: int):
        self.engine, self.decay, self.start_step = engine, decay, start_step
        self.names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
        self.shards = [t.detach().clone() for t in self._local()]

    def _local(self) -> list[torch.Tensor]:
        return [safe_get_local_fp32_param(p) for p in self.engine.module.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after each generator update with the training step (Self-Forcing: decay 0.99 from step 200)."""
        current = self._local()
        if step < self.start_step:
            torch._foreach_copy_(self.shards, current)        # track exactly until the EMA starts
        else:
            torch._foreach_lerp_(self.shards, current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        return {"names": self.names, "shards": [s.cpu() for s in self.shards],
                "numel": [p.ds_numel for p in params], "shape": [list(p.ds_shape) for p in params],
                "rank": dist.get_rank(), "world": dist.get_world_size(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names or state["world"] != dist.get_world_size():
            raise ValueError("EMA shards were saved with another model or world size")
        for dst, src in zip(self.shards, state["shards"]):
            dst.copy_(src)


@dataclass
class Engines:
    generator: object
    fake_score: object | None
    teacher: object | None
    ema: FP32ShardEMA | None


def build_trained_engine(cfg: TrainConfig, ds_cfg: dict, optim: OptimConfig):
    """One trained engine (generator or fake score): ZeRO-3, AdamW on the param groups, checkpointing."""
    model = _build_model(cfg, ds_cfg, trained=True)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, optim), config=ds_cfg)
    engine.train()
    return engine


def build_engines(cfg: TrainConfig, ds_config: dict) -> Engines:
    """Teacher first (frozen), then the trained engines. For `objective: flow` only one trained
    engine (in the generator slot) is built."""
    use_compile = cfg.model.compile_elementwise
    if use_compile if use_compile is not None else torch.cuda.is_available():
        compile_elementwise_ops()
    skip_single_rank_fetch_sync()
    configs = engine_configs(ds_config, cfg)

    def trained(name: str, optim: OptimConfig):
        return build_trained_engine(cfg, configs[name], optim)

    teacher = None
    if cfg.objective == "dmd" and cfg.model.teacher_sharding == "replicated":
        teacher = replicated_teacher(cfg, configs["teacher"])
    elif cfg.objective == "dmd":
        model = _build_model(cfg, configs["teacher"], trained=False).requires_grad_(False)
        teacher, *_ = deepspeed.initialize(model=model, config=configs["teacher"])
        teacher.eval()
    generator = trained("generator", cfg.generator_optim)
    fake_score = trained("fake_score", cfg.critic_optim) if cfg.objective == "dmd" else None
    ema = FP32ShardEMA(generator, cfg.ema.decay, cfg.ema.start_step) if cfg.ema.enabled else None
    return Engines(generator, fake_score, teacher, ema)
