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
    if name in ("Config", "ModelConfig", "load_config"):
        import gpt.config

        return getattr(gpt.config, name)
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
