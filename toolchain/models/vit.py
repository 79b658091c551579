"""A small Vision Transformer (Dosovitskiy et al., 2020) in plain PyTorch, with seeded weights.

ViT-Ti/16's shape (16×16 patches of a 224×224 image, width 192, 12 pre-norm blocks of 3-head
self-attention and a 768-wide GELU MLP, class token, 5.7 M parameters, ~1.3 GFLOP). Attention is
written out with matmuls and softmax, so every engine sees the same plain graph. LayerNorm, not
BatchNorm, keeps activations in scale, so seeded weights (timm's truncated-normal 0.02) give
outputs that follow the input without statistics from data. ``module:callable`` for
``edgesmith build``: ``edgesmith.toolchain.models.vit:vit_small`` with ``--input-shape 1,3,224,224``.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIZE = 224


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, classes: int = 1000, patch: int = 16, dim: int = 192, depth: int = 12, heads: int = 3,
                 mlp: int = 768, image: int = IMAGE_SIZE):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_small(seed: int = 0, classes: int = 1000) -> ViT:
    """ViT-Ti/16-sized model with seeded weights: truncated-normal(0.02) linear layers, patch
    embedding, class token and position embeddings; zero biases; LayerNorm at 1 and 0."""
    generator = torch.Generator().manual_seed(seed)
    model = ViT(classes)

    def trunc_normal(t: torch.Tensor) -> None:
        t.copy_(torch.randn(t.shape, generator=generator).clamp_(-2, 2) * 0.02)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                trunc_normal(module.weight)
                module.bias.zero_()
        trunc_normal(model.cls_token)
        trunc_normal(model.pos_embed)
    return model.eval()
