"""mtp: multi-token prediction language models (Gloeckle et al., ICML 2024)."""

from .loss import IGNORE, align_targets, mtp_backward, mtp_loss
from .model import PRESETS, ConfigError, ModelConfig, MTPModel

__all__ = [
    "IGNORE", "PRESETS", "ConfigError", "ModelConfig", "MTPModel",
    "align_targets", "mtp_backward", "mtp_loss",
]
__version__ = "0.1.0"
