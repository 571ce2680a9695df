"""gpt: a small, readable GPT pretraining framework.

``GPT``, ``Config``, ``ModelConfig`` and ``load_config`` are imported on first use, so that
``import gpt.data...`` (the data tools) does not pull in torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "GPT", "Config", "ModelConfig", "load_config"]


def __getattr__(name: str):
    if name == "GPT":
        from gpt.model import GPT

        return GPT
    if name in ("Config", "ModelConfig"):
        import gpt.config

        return getattr(gpt.config, name)
    if name == "load_config":
        from gpt.config_io import load_config

        return load_config
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
