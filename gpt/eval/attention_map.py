"""Attention maps: the attention weights of every layer and head on one prompt, as a grid
of heatmaps (layers × heads) with the tokens on the axes, the picture BertViz (Vig 2019)
made familiar. Row i of a heatmap is what query token i attends to.

The weights come from the ``naive`` backend (``naive_attention(..., return_weights=True)``),
swapped in for one forward pass whatever backend the model otherwise uses: fused kernels
never materialise the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gpt.attention import naive_attention
from gpt.model import GPT

MAX_LABELLED = 64  # beyond this many tokens the axes carry no labels (they would overlap)


@torch.no_grad()
def attention_weights(model: GPT, idx: Tensor) -> list[Tensor]:
    """Attention weights of one sequence ``idx`` (1, T): a list over layers of (H, T, T)
    float32 CPU tensors, each row summing to 1."""
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"attention maps take one sequence (1, T), got {tuple(idx.shape)}")
    weights: list[Tensor] = []

    def capture(q, k, v, causal, scale):
        out, w = naive_attention(q, k, v, causal, scale, return_weights=True)
        weights.append(w[0].float().cpu())  # (H, T, T)
        return out

    blocks = list(model.transformer.h)
    saved = [b.attn.attend for b in blocks]
    was_training = model.training
    model.eval()
    try:
        for b in blocks:
            b.attn.attend = capture
        model(idx)
    finally:
        for b, attend in zip(blocks, saved, strict=True):
            b.attn.attend = attend
        model.train(was_training)
    return weights


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """One readable label per token: whitespace made visible (· for a space, \\n, \\t)."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i])
        labels.append(text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t"))
    return labels


def plot_attention_map(
    weights: list[Tensor], labels: list[str], path: str | Path, title: str = ""
) -> Path:
    """Save the grid of heatmaps (rows: layers, columns: heads) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    n_layer, n_head, T = len(weights), weights[0].shape[0], weights[0].shape[-1]
    if len(labels) != T:
        raise ValueError(f"{len(labels)} labels for {T} tokens")
    panel = min(4.0, max(1.6, 0.12 * T + 0.8))  # inches per heatmap
    fig, axes = plt.subplots(
        n_layer, n_head, figsize=(panel * n_head + 1, (panel + 0.4) * n_layer + 1), squeeze=False
    )
    font = max(4, min(8, 200 // max(T, 1)))
    for layer, w in enumerate(weights):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(w[head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="equal")
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if T <= MAX_LABELLED and head == 0:  # queries down the first column
                ax.set_yticks(range(T), labels, fontsize=font)
            if T <= MAX_LABELLED and layer == n_layer - 1:  # keys along the bottom row
                ax.set_xticks(range(T), labels, fontsize=font, rotation=90)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
