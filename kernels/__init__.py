"""Triton kernels (installed as `gpt.kernels`)."""
