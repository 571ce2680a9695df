"""gpt: a small, readable GPT pretraining framework."""

from gpt.config import Config, ModelConfig, load_config
from gpt.model import GPT

__all__ = ["GPT", "Config", "ModelConfig", "load_config"]
