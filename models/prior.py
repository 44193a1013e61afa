"""`model.kind: prior`: a small decoder-only transformer over the code indices of a frozen VQ or FSQ
model, so a quantized autoencoder can sample (van den Oord et al. 2017 used a PixelCNN; a causal
transformer over the codes in raster order, as in taming-transformers, is the same idea).

The codes of one image are read in raster order, `b h w -> b (h w)`; position i sees the start
token and codes 0..i-1 and predicts code i. The start token is the condition: a class embedding
(or a linear map of a multi-hot label vector) when the VQ model is conditional, with a null
condition for `cond=None` and for the training samples `cond_dropout` hits, else one learnt vector.
harness/tasks.py's PriorTask encodes each batch with the frozen VQ model and trains this on the codes.

Axis letters: b batch, l sequence (h w, raster order), k codebook entries, e model width,
n heads, d head width, h w the code grid.

`VQWithPrior` puts a prior beside its VQ model behind the autoencoder interface (encode, decode,
forward, sample), so sampling, per-class grids and launch/sample.py need no other path.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from einops import rearrange
from torch import nn

from models.base import Autoencoder, AutoencoderOutput, ModelConfigError
from models.blocks import exists
from models.conditioning import ConditionEmbedding

QUANTIZED_KINDS = ("vq", "fsq")


# ---------------------------------------------------------------------------------------------
# The transformer
# ---------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """`b l e` -> `b l e`. With `cache` (sampling), x holds only the newest position and the keys
        and values of the earlier ones are read from and appended to it, so it attends to all of them."""
        q, k, v = rearrange(self.qkv(x), "b l (three n d) -> three b n l d", three=3, n=self.heads)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        causal = cache is None  # one new query attends to every cached key: no mask needed
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(rearrange(out, "b n l d -> b l (n d)")))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


def pick(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One code per row of `b k` logits: softmax(logits / temperature) over the `top_k` most likely
    codes (0 = all); temperature 0 takes the most likely code."""
    logits = logits.float()
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or a value float32 cannot tell from 0 (0/0 = NaN)
        return logits.argmax(-1)
    # From the row's maximum down: a tiny temperature then sends the others to -inf (the argmax), never inf - inf
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class CodePrior(nn.Module):
    """p(codes | condition) = prod_i p(code_i | start, code_<i), one softmax over the codebook per position.

    codebook_size, grid: the VQ model's codebook (FSQ: the product of its levels) and its code grid
    `(h, w)` at the training image size; both come from `model.prior_vq` (the task fills them in).
    """

    task = "prior"  # harness/tasks.py: PriorTask

    def __init__(self, *, codebook_size: int, grid: tuple[int, int], dim: int = 256, layers: int = 4, heads: int = 4,
                 dropout: float = 0.0, condition: str | None = None, num_classes: int = 0, cond_dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"CodePrior: width {dim} is not divisible into {heads} heads")
        self.codebook_size, self.grid = codebook_size, tuple(grid)
        self.condition = condition if condition in ("class", "multilabel") else None
        self.num_classes, self.cond_dropout = num_classes, cond_dropout
        length = self.grid[0] * self.grid[1]
        self.tok = nn.Embedding(codebook_size, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        if self.condition:
            self.start = ConditionEmbedding(kind=self.condition, num_classes=num_classes, dim=dim, dropout=cond_dropout)
        else:
            self.start = nn.Parameter(torch.randn(dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, codebook_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1]

    def start_token(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """`b e`: the condition's embedding (null for cond=None or class -1), or the learnt start vector."""
        if self.condition:
            return self.start(cond, batch, drop=self.training)
        return self.start.expand(batch, -1)

    def forward(self, indices: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Code indices `b h w` -> next-code logits `b (h w) k`: position i predicts code i."""
        if tuple(indices.shape[1:]) != self.grid:
            raise ValueError(f"CodePrior: codes of grid {tuple(indices.shape[1:])}, but this prior models {self.grid}")
        codes = rearrange(indices, "b h w -> b (h w)")
        start = self.start_token(cond, codes.shape[0])
        x = torch.cat([rearrange(start, "b e -> b 1 e"), self.tok(codes[:, :-1])], dim=1)  # shifted right by one
        x = self.drop(x + self.pos.to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, temperature: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` code grids `b h w`, one position at a time (keys and values cached). `cond`: `n` class
        indices (-1 = none) or `n k` multi-hot vectors; None = the null condition (trained only with
        cond_dropout > 0). temperature and top_k as in `pick`; a seeded `generator` repeats the draw."""
        if not (0 <= temperature < math.inf) or top_k < 0:
            raise ValueError(f"sample: temperature ({temperature}) must be finite and >= 0, top_k ({top_k}) >= 0")
        if exists(cond) and self.condition and cond.shape[0] != n:
            raise ValueError(f"sample: cond has {cond.shape[0]} rows but n={n} samples were asked for")
        x = self.start_token(cond, n)
        dtype = self.tok.weight.dtype
        caches = [{} for _ in self.blocks]
        out = []
        for i in range(self.length):
            h = rearrange(x.to(dtype) + self.pos[i].to(dtype), "b e -> b 1 e")
            for block, cache in zip(self.blocks, caches, strict=True):
                h = block(h, cache)
            code = pick(self.head(self.norm(h))[:, -1], temperature, top_k, generator)
            out.append(code)
            x = self.tok(code)
        return rearrange(torch.stack(out, dim=1), "b (h w) -> b h w", h=self.grid[0], w=self.grid[1])

    # --- settings ------------------------------------------------------------------------------

    config_keys = ("prior_vq", "prior_layers", "prior_dim", "prior_heads", "prior_dropout", "prior_codebook_size",
                   "prior_grid", "condition", "num_classes", "cond_dropout")

    @classmethod
    def from_config(cls, m) -> CodePrior:
        if not m.prior_codebook_size or len(m.prior_grid) != 2:
            raise ModelConfigError("model.prior_codebook_size: not filled in yet; the prior task derives it and "
                                   "model.prior_grid from model.prior_vq before the model is built")
        return cls(codebook_size=m.prior_codebook_size, grid=tuple(m.prior_grid), dim=m.prior_dim,
                   layers=m.prior_layers, heads=m.prior_heads, dropout=m.prior_dropout, condition=m.condition,
                   num_classes=m.num_classes, cond_dropout=m.cond_dropout)

    @classmethod
    def check_config(cls, m, image_size: int) -> None:
        if m.prior_dim % m.prior_heads:
            raise ModelConfigError(f"model.prior_heads: {m.prior_dim} (model.prior_dim) is not divisible into "
                                   f"{m.prior_heads} heads")
        if m.prior_grid and (len(m.prior_grid) != 2 or min(m.prior_grid) < 1):
            raise ModelConfigError(f"model.prior_grid: need [h, w] of positive integers (or [] = from model.prior_vq); "
                                   f"got {m.prior_grid}")
        kind = vq_kind_of(m.prior_vq)
        if kind not in QUANTIZED_KINDS:
            raise ModelConfigError(f"model.prior_vq: {m.prior_vq} holds a model.kind={kind} model; a prior models the "
                                   f"codes of a {' or '.join(QUANTIZED_KINDS)} run")

    @classmethod
    def deepspeed_unsupported(cls, m) -> str | None:
        return None


def vq_kind_of(folder: str) -> str:
    """`model.kind` of the run, checkpoint or export folder `folder` (its config.yaml), for a one-line
    check at config time; harness/tasks.py loads the model itself."""
    if not folder:
        raise ModelConfigError("model.prior_vq: missing; give the VQ or FSQ run (or checkpoint, or export folder) "
                               "whose codes the prior models")
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ModelConfigError(f"model.prior_vq: {folder}: is a file; give the VQ model's run, checkpoint or export "
                               "folder (the one holding config.yaml)")
    if not path.is_dir():
        pruned = (" (a checkpoint its run has pruned since? checkpoint.keep_last removes old step_N folders: point "
                  "model.prior_vq at an export of the VQ model, launch/export.py, which no training prunes)"
                  if path.parent.name == "checkpoints" else "")
        raise ModelConfigError(f"model.prior_vq: {folder}: no such run, checkpoint or export folder{pruned}")
    config = path / "config.yaml"
    if not config.is_file():
        raise ModelConfigError(f"model.prior_vq: {folder}: not a run, checkpoint or export folder (no config.yaml)")
    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as e:
        raise ModelConfigError(f"model.prior_vq: {config}: not readable YAML ({str(e).splitlines()[0]})") from None
    model = raw.get("model") if isinstance(raw, dict) else None
    return str((model or {}).get("kind", "kl"))


# ---------------------------------------------------------------------------------------------
# A VQ model that samples
# ---------------------------------------------------------------------------------------------


class VQWithPrior(Autoencoder):
    """A frozen VQ/FSQ autoencoder and a prior over its codes, behind the autoencoder interface.

    encode/decode/forward are the VQ model's; `sample` draws codes from the prior (with this
    object's `temperature` and `top_k`) and decodes them. `cond=None` with a class-conditional prior
    or VQ model whose null class never trained (its cond_dropout 0) draws a class per sample, which
    both then read (the VQ decoder's null row would be its initial random vector).
    """

    def __init__(self, vq: Autoencoder, prior: CodePrior, *, temperature: float = 1.0, top_k: int = 0):
        super().__init__()
        self.vq, self.prior = vq, prior
        self.temperature, self.top_k = temperature, top_k
        self.condition = vq.condition

    def encode(self, x, cond=None):
        return self.vq.encode(x, cond)

    def decode(self, z, cond=None):
        return self.vq.decode(z, cond)

    def forward(self, x, cond=None, sample_posterior: bool = True) -> AutoencoderOutput:
        return self.vq(x, cond=cond, sample_posterior=sample_posterior)

    def latent_shape(self, image_size: int):
        return self.vq.latent_shape(image_size)

    @torch.no_grad()
    def sample(self, n: int, image_size: int, cond=None, generator=None) -> torch.Tensor:
        grid = tuple(self.vq.latent_shape(image_size)[1:])
        if grid != self.prior.grid:
            raise ValueError(f"sample: image size {image_size} gives a {grid[0]}x{grid[1]} code grid; the prior was "
                             f"trained on {self.prior.grid[0]}x{self.prior.grid[1]}")
        device = self.prior.pos.device
        vq_null = getattr(getattr(self.vq, "cond_embed", None), "dropout", 0) > 0
        if cond is None and self.prior.condition == "class" and not (self.prior.cond_dropout and vq_null):
            cond = torch.randint(self.prior.num_classes, (n,), generator=generator, device=generator.device
                                 if generator is not None else device).to(device)
        codes = self.prior.sample(n, cond=cond, temperature=self.temperature, top_k=self.top_k, generator=generator)
        return self.vq.decode_indices(codes, cond).float()
