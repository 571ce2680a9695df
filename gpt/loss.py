"""The LM head and its cross-entropy in chunks of tokens: the logits are never held in full.

The plain loss (gpt/model.py) projects all N = B·T tokens onto the padded vocabulary V' at
once: for GPT-2 at micro-batch 16 that is a 16,384 × 50,304 matrix, 1.6 GB in bf16 and
3.3 GB again as the fp32 copy the cross-entropy reads, kept until the backward pass, which
writes a gradient of the same size. Here the tokens go through in chunks of ``chunk``:

    forward   per chunk: logits = x_c W^T in the compute dtype (n × V'), padding columns
              (index >= V) set to -inf, then in fp32: lse = logsumexp(logits), the loss
              sum of lse - logits[target]; only lse (4 bytes per token) is kept
    backward  per chunk, the logits computed again: dlogits = (softmax - onehot(target))
              · dloss / count, zero on rows whose target is ignore_index and on the padding
              columns (softmax(-inf) = 0); dx_c = dlogits W, dW += dlogits^T x_c (fp32)

so the largest intermediate is one chunk's logits (n × V', fp32) instead of all of them, at
the price of the head's forward matmul done twice (2 N C V' more FLOPs, a third more than
the head's forward and backward). This is the chunked loss of Liger-Kernel's fused linear
cross-entropy (Hsu et al. 2024) and of Wijmans et al. 2024 ("Cut Your Losses in
Large-Vocabulary Language Models"), written in PyTorch: the chunk's matmuls are cuBLAS's
and torch.compile fuses the elementwise work between them. tests/test_loss.py checks it
against the plain path in float64, loss and both gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight^T over the rows whose target is not
    ``ignore_index``, the columns >= ``vocab_size`` masked; x (N, C) and weight (V', C) in
    the compute dtype, the softmax in at least fp32."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk: int, ignore_index: int):
        N = x.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 in tests
        lse = torch.empty(N, dtype=acc, device=x.device)  # (N,): all the backward needs
        total = torch.zeros((), dtype=acc, device=x.device)
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            logits = (x[start:end] @ weight.T).to(acc)  # (n, V')
            logits[:, vocab_size:] = float("-inf")
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            t = targets[start:end]
            valid = t != ignore_index
            picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)  # (n,)
            total += torch.where(valid, lse[start:end] - picked, 0).sum()
        count = (targets != ignore_index).sum()
        ctx.save_for_backward(x, weight, targets, lse, count)
        ctx.vocab_size, ctx.chunk, ctx.ignore_index = vocab_size, chunk, ignore_index
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, lse, count = ctx.saved_tensors
        V, chunk, ignore_index = ctx.vocab_size, ctx.chunk, ctx.ignore_index
        need_x, need_w = ctx.needs_input_grad[:2]
        acc = lse.dtype
        scale = grad_loss.to(acc) / count  # d(mean)/d(row loss), times the upstream gradient
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        for start in range(0, x.shape[0], chunk):
            end = min(start + chunk, x.shape[0])
            x_c, t = x[start:end], targets[start:end]
            logits = (x_c @ weight.T).to(acc)  # (n, V'), recomputed
            logits[:, V:] = float("-inf")
            g = torch.exp(logits - lse[start:end, None])  # softmax; 0 on the padding columns
            valid = t != ignore_index
            rows = torch.arange(end - start, device=x.device)
            g[rows, t.clamp(min=0)] -= valid.to(acc)  # minus the one-hot target
            g = (g * torch.where(valid, scale, 0)[:, None]).to(x.dtype)  # (n, V')
            if need_x:
                grad_x[start:end] = g @ weight  # (n, C)
            if need_w:
                grad_w += (g.T @ x_c).to(acc)  # (V', C), summed over chunks in fp32
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_x, grad_w, None, None, None, None


def chunked_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    vocab_size: int,
    chunk: int,
    ignore_index: int = -1,
) -> Tensor:
    """Mean cross-entropy of the logits ``x @ weight[:vocab_size].T`` against ``targets``,
    rows whose target is ``ignore_index`` left out, computed ``chunk`` tokens at a time
    (module docstring). x: (N, C) final hidden states; weight: (V', C) the LM head's rows,
    V' >= vocab_size (the rows past it are padding); targets: (N,) int64. Under autocast the
    matmuls run in its dtype, as ``nn.Linear`` would; the softmax is at least fp32."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):  # dtypes are explicit inside
        return ChunkedCrossEntropy.apply(x, weight, targets, vocab_size, chunk, ignore_index)
