"""Condition embeddings for conditional autoencoders.

Axis letters: b batch, k label-vector length (multi-hot), e embedding width, c channels,
h height, w width, l length, d depth, f features.

A condition is a class index per sample (`b`, long) or a multi-hot label vector (`b k`, float).
Both become an embedding `b e` that the encoder reads as extra input channels and the decoder
reads as extra input channels and through FiLM in its residual blocks. A reserved *null*
embedding stands for "no condition": it is used for `cond=None`, for class index -1, and for the
training samples hit by condition dropout, so the same model also samples unconditionally.
"""

from __future__ import annotations

import torch
from einops import repeat
from torch import nn

from models.blocks import exists


def concat_condition(x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
    """Append the embedding `b e` to `x` along axis 1 as constant channels (or features when `x`
    is flat `b f`): `b c ...` -> `b (c + e) ...`. Identity when emb is None."""
    if not exists(emb):
        return x
    emb = emb.to(x.dtype)
    patterns = {2: "b e -> b e", 3: "b e -> b e l", 4: "b e -> b e h w", 5: "b e -> b e d h w"}
    sizes = dict(zip({3: "l", 4: "hw", 5: "dhw"}.get(x.ndim, ""), x.shape[2:]))
    return torch.cat([x, repeat(emb, patterns[x.ndim], **sizes)], dim=1)


class ConditionEmbedding(nn.Module):
    """Class indices or multi-hot vectors -> `b e`, with a learnt null embedding.

    kind="class": an embedding table with one extra row (index num_classes) as the null class.
    kind="multilabel": a linear map of the multi-hot vector plus a separate null vector (an image
    with no labels and an unconditioned sample are different things).
    dropout: share of samples whose condition is replaced by the null one while training.
    """

    def __init__(self, *, kind: str = "class", num_classes: int = 10, dim: int = 64, dropout: float = 0.0):
        super().__init__()
        if kind not in ("class", "multilabel"):
            raise ValueError(f"condition: {kind!r} is not one of class, multilabel")
        if num_classes < 1:
            raise ValueError(f"condition: num_classes must be >= 1 for a {kind} condition; got {num_classes}")
        self.kind, self.num_classes, self.dim, self.dropout = kind, num_classes, dim, dropout
        if kind == "class":
            self.embed = nn.Embedding(num_classes + 1, dim)
        else:
            self.embed = nn.Linear(num_classes, dim)
            self.null = nn.Parameter(torch.randn(dim) * 0.02)

    def null_embedding(self, batch: int) -> torch.Tensor:
        if self.kind == "class":
            idx = torch.full((batch,), self.num_classes, dtype=torch.long, device=self.embed.weight.device)
            return self.embed(idx)
        return self.null.expand(batch, -1)

    def _check(self, cond: torch.Tensor, batch: int) -> None:
        if self.kind == "class":
            if cond.ndim != 1 or cond.dtype.is_floating_point or cond.dtype == torch.bool:
                raise ValueError(
                    f"condition: class conditioning needs integer class indices of shape (b,); "
                    f"got {cond.dtype} of shape {tuple(cond.shape)}"
                )
            # A range check needs the values on the host: done on CPU only, never as a GPU sync.
            if cond.device.type == "cpu" and cond.numel() and int(cond.max()) >= self.num_classes:
                raise ValueError(f"condition: class index {int(cond.max())} >= model.num_classes={self.num_classes}")
        elif cond.ndim != 2 or cond.shape[1] != self.num_classes:
            raise ValueError(
                f"condition: multilabel conditioning needs a (b, {self.num_classes}) multi-hot tensor; "
                f"got shape {tuple(cond.shape)}"
            )
        if cond.shape[0] != batch:
            raise ValueError(f"condition: {cond.shape[0]} conditions for a batch of {batch}")

    def forward(self, cond: torch.Tensor | None, batch: int, drop: bool = False) -> torch.Tensor:
        """`b e` embeddings; cond=None gives the null embedding for the whole batch.

        drop=True (training) replaces each sample's condition by the null one with prob `dropout`.
        """
        if not exists(cond):
            return self.null_embedding(batch)
        self._check(cond, batch)
        device = self.embed.weight.device
        cond = cond.to(device)
        dropped = None
        if drop and self.dropout > 0:
            dropped = torch.rand(batch, device=device) < self.dropout
        if self.kind == "class":
            null = torch.full_like(cond, self.num_classes)
            cond = torch.where(cond < 0, null, cond)  # -1 = unconditioned, per sample
            if exists(dropped):
                cond = torch.where(dropped, null, cond)
            return self.embed(cond)
        emb = self.embed(cond.to(self.embed.weight.dtype))
        # The null vector stays in the graph even when nothing is dropped: DDP then sees a (zero)
        # gradient for it every step instead of an unused parameter.
        dropped = dropped if exists(dropped) else torch.zeros(batch, dtype=torch.bool, device=device)
        return torch.where(dropped[:, None], self.null.to(emb.dtype).expand_as(emb), emb)
