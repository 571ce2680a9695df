"""What the trainer measures at each evaluation: validation losses and text samples.

Both run the model uncompiled (``eager``): evaluation under ``no_grad`` and decoding at other
shapes would otherwise make ``torch.compile`` recompile the training graph, and with
automatic dynamic shapes the recompiled training graph is slower for the rest of the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from gpt.data.loader import TokenLoader
from gpt.generate import encode_prompt, sample_texts


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its ``nn.Module.compile()`` result set aside for a while: calls run the
    plain forward (hooks included) and leave the compiled training graph untouched."""
    compiled = model.__dict__.get("_compiled_call_impl")
    model._compiled_call_impl = None
    try:
        yield model
    finally:
        model._compiled_call_impl = compiled


@torch.no_grad()
def validation_loss(
    forward: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    loader: TokenLoader,
    steps: int,
    device: torch.device,
) -> Tensor:
    """Mean loss of ``forward(x, y) -> (logits, loss)`` over the first ``steps`` batches of
    ``loader`` (reset first: the same batches at every evaluation), on this rank; a float64
    device scalar (summed as Python floats would be), not read here."""
    loader.reset()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        x, y = (t.to(device) for t in loader.next_batch())
        total += forward(x, y)[1].detach().double()
    return total / steps


@torch.no_grad()
def eval_samples(
    model: nn.Module, tokenizer, prompts: list[str], new_tokens: int, seed: int
) -> dict[str, str]:
    """A continuation of each prompt (temperature 0.8, top-k 200, the same seed every time,
    so that evaluations differ only by the weights). Uses its own generator: training's RNG
    streams are untouched."""
    was_training = model.training
    model.eval()
    texts = {}
    try:
        for prompt in prompts:
            ids, _ = encode_prompt(tokenizer, prompt, model.cfg.block_size)
            (texts[prompt],) = sample_texts(
                model, tokenizer, ids, 1, new_tokens, temperature=0.8, top_k=200, seed=seed
            )
    finally:
        model.train(was_training)
    return texts
