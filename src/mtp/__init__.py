"""mtp: multi-token prediction language models (Gloeckle et al., ICML 2024)."""

from .checkpoint import load_model, save_checkpoint
from .generate import generate, generate_reference
from .loss import IGNORE, align_targets, mtp_backward, mtp_loss
from .model import PRESETS, ConfigError, ModelConfig, MTPModel
from .modes import DecodeMode, parse_mode
from .speculative import speculative_generate, speculative_sample, tree_generate
from .train import TrainConfig, train

__all__ = [
    "IGNORE", "PRESETS", "ConfigError", "DecodeMode", "ModelConfig", "MTPModel", "TrainConfig",
    "align_targets", "generate", "generate_reference", "load_model", "mtp_backward", "mtp_loss", "parse_mode",
    "save_checkpoint", "speculative_generate", "speculative_sample", "train", "tree_generate",
]
__version__ = "0.1.0"
