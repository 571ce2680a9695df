"""gpt: a small, readable GPT pretraining framework."""

__version__ = "0.1.0"

from gpt.config import Config, ModelConfig, load_config
from gpt.model import GPT

__all__ = ["__version__", "GPT", "Config", "ModelConfig", "load_config"]
