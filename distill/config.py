"""The typed training config: YAML recipe + `key=value` overrides -> nested dataclasses,
validated before any model is built (a bad key or value stops with its dotted name)."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distill.dmd import DMDConfig
from distill.schedules import LRSchedule


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    variant: str = "tiny"                 # precompute.variants name; sets the DiT architecture
    checkpoint: str | None = None         # official Ovi safetensors; None only for `tiny` (seeded init)
    init_seed: int = 0
    gradient_checkpointing: bool = True   # generator and fake score (the teacher never needs it)
    compile_elementwise: bool | None = None  # torch.compile the element-wise ops; None: on for CUDA
    num_layers: int | None = None         # override the variant's depth (benchmarks, experiments)
    random_init: bool = False             # benchmarks only: keep the constructor's init, load nothing
    # zero3: the teacher's weights are partitioned like the trained engines' (2 bytes/param over all
    # GPUs), gathered in each of its 2 passes per generator step. replicated: a full bf16 copy on every
    # GPU (+2 bytes/param/GPU, ~23 GB for Ovi) and no gathers: for GPUs with the memory to spare
    # (H200/B200) or a slow interconnect, where those gathers cost more than the teacher's compute.
    teacher_sharding: str = "zero3"
    # ZeRO-3 fetch units: attention modules and block MLPs gathered whole (distill/engines.py) instead
    # of per Linear; false: DeepSpeed's default per-module fetches.
    zero3_leaf_modules: bool = True


@dataclass
class OptimConfig:
    lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 10.0
    # Optional per-part learning-rate multipliers: the video tower, the audio tower, and the
    # fusion parameters (k_fusion, v_fusion, their norms) of both towers.
    lr_scale_video: float = 1.0
    lr_scale_audio: float = 1.0
    lr_scale_fusion: float = 1.0
    schedule: LRSchedule = field(default_factory=LRSchedule)  # distill/schedules.py; logged as lr/<engine>


@dataclass
class EMAConfig:
    decay: float = 0.99
    start_step: int = 200          # training step from which the EMA averages; before it, it tracks the weights
    enabled: bool = True


@dataclass
class DataSettings:
    batch_size: int = 1
    i2v_ratio: float = 0.5
    shuffle_buffer: int = 16
    seed: int = 0
    pairs: str | None = None       # teacher pairs (distill/pairs.py): flow fine-tune data, DMD regression targets


@dataclass
class LogConfig:
    wandb_mode: str = "offline"    # offline | online | disabled
    wandb_project: str = "ovi-dmd"
    every: int = 1
    run_name: str | None = None


@dataclass
class TrainConfig:
    objective: str = "dmd"          # dmd | flow (plain flow-matching fine-tuning of one engine)
    seed: int = 0
    max_steps: int = 1000
    save_every: int = 100
    keep_checkpoints: int = 3
    max_nonfinite_in_a_row: int = 5
    model: ModelConfig = field(default_factory=ModelConfig)
    generator_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-7))
    ema: EMAConfig = field(default_factory=EMAConfig)
    dmd: DMDConfig = field(default_factory=DMDConfig)
    data: DataSettings = field(default_factory=DataSettings)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "TrainConfig":
        from precompute.variants import VARIANTS
        checks = [
            (self.objective in ("dmd", "flow"), "objective", "must be 'dmd' or 'flow'"),
            (self.max_steps > 0, "max_steps", "must be > 0"),
            (self.save_every > 0, "save_every", "must be > 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1"),
            (self.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row", "must be >= 1"),
            (self.model.variant in VARIANTS, "model.variant", f"must be one of {sorted(VARIANTS)}"),
            (self.model.num_layers is None or self.model.num_layers >= 1, "model.num_layers", "must be >= 1"),
            (self.model.checkpoint is not None or self.model.variant == "tiny" or self.model.random_init, "model.checkpoint",
             "is required for real variants (the official Ovi safetensors file)"),
            (0.0 <= self.ema.decay < 1.0, "ema.decay", "must be in [0, 1)"),
            (self.model.teacher_sharding in ("zero3", "replicated"), "model.teacher_sharding", "zero3 | replicated"),
            (self.data.batch_size >= 1, "data.batch_size", "must be >= 1"),
            (0.0 <= self.data.i2v_ratio <= 1.0, "data.i2v_ratio", "must be in [0, 1]"),
            (self.log.wandb_mode in ("offline", "online", "disabled"), "log.wandb_mode", "offline | online | disabled"),
        ]
        for name, optim in (("generator_optim", self.generator_optim), ("critic_optim", self.critic_optim)):
            checks += [(optim.lr > 0, f"{name}.lr", "must be > 0"),
                       (all(0 <= b < 1 for b in optim.betas), f"{name}.betas", "each must be in [0, 1)"),
                       (optim.grad_clip >= 0, f"{name}.grad_clip", "must be >= 0")]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"config field {name}: {why}")
        if self.model.checkpoint is not None and not Path(self.model.checkpoint).is_file():
            raise ConfigError(f"config field model.checkpoint: no such file {self.model.checkpoint}")
        return self


def _coerce(value, hint, name: str):
    """Convert a YAML/CLI value to the annotated type, or raise naming the field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(f"config field {name}: {value!r} is not a {hint}")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else str(value).strip("()[] ").split(",")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"config field {name}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(items, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config field {name}: {value!r} is not a bool")
    if hint in (int, float, str):
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config field {name}: {value!r} is not an int")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field {name}: {value!r} is not a {hint.__name__}") from None
    raise ConfigError(f"config field {name}: unsupported type {hint}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config field {prefix + key}: expected a mapping")
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section's own validation (e.g. DMDConfig) names its field
        raise ConfigError(f"config section {prefix.rstrip('.') or 'top level'}: {err}") from None


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        _set_dotted(tree, key.strip(), value)
    return _build(TrainConfig, tree).validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
