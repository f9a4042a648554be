"""Ovi's fusion DiT with the official checkpoint layout, and its loaders."""
from .config import OviConfig, TowerConfig, variant_config
from .loading import CheckpointError, load_ovi_checkpoint, load_ovi_checkpoint_zero3, save_ovi_checkpoint
from .ovi_fusion import OviFusion, init_weights

__all__ = ["OviConfig", "TowerConfig", "variant_config", "OviFusion", "init_weights", "CheckpointError",
           "load_ovi_checkpoint", "load_ovi_checkpoint_zero3", "save_ovi_checkpoint"]
