"""Hand-off to and from diffusers: our arch=ldm models <-> `AutoencoderKL` / `VQModel` folders.

A diffusers autoencoder folder is `config.json` + `diffusion_pytorch_model.safetensors`; a
pipeline keeps it in its `vae/` (or `vqvae/`) subfolder. Our arch=ldm encoder and decoder are the
network diffusers' `Encoder` / `Decoder` were ported from, so the weights map one to one; only
names and two layouts differ (the table `RULES` below, used in both directions):

- attention q/k/v/proj_out are 1x1 convs here (`o i 1 1`) and Linear layers there (`o i`);
- our decoder keeps `up.<i>` = resolution level i (0 = full size), diffusers' `up_blocks` run
  from the smallest level up, so `up.<i>` is `up_blocks.<n-1-i>` for n levels.

What diffusers cannot express is refused in one line (`DiffusersError`): layer-spec models,
conditional models, linear attention, pooling instead of strided convs, ... (see `check_exportable`).
diffusers itself is not needed here (it is a test extra): the files are written and read directly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from einops import rearrange

from models.weights import load_reason, state_dict_problem
from shards.atomic import write_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# read as well, in this order: the older pickle name (safe: torch.load(weights_only=True)) and the fp16 variant
OTHER_WEIGHTS = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors")
SUBFOLDERS = ("vae", "vqvae")  # where a pipeline keeps its autoencoder
CLASSES = {"kl": "AutoencoderKL", "vq": "VQModel"}
DIFFUSERS_VERSION = "0.30.0"  # written when diffusers is not installed: the first with every key we write


class DiffusersError(ValueError):
    """A model or folder that does not map between our names and diffusers' (one line saying why)."""


# ---------------------------------------------------------------------------------------------
# The key table
# ---------------------------------------------------------------------------------------------

# A module of ours -> the same module in diffusers, by name prefix. {i} = resolution level, {j} = block
# in the level, {u} = the level counted from the smallest (n - 1 - i): diffusers' decoder order.
# `parts` renames the first name after the prefix (a residual block's or attention block's layers).
RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
LEGACY_ATTN = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # diffusers < 0.14 names, read only
WHOLE = None  # the prefix is the whole module: weight/bias follow directly

RULES: list[tuple[str, str, dict | None]] = [
    # ours                             diffusers                                    layers inside
    ("encoder.conv_in",                "encoder.conv_in",                           WHOLE),
    ("encoder.down.{i}.block.{j}",     "encoder.down_blocks.{i}.resnets.{j}",       RESNET),
    ("encoder.down.{i}.attn.{j}",      "encoder.down_blocks.{i}.attentions.{j}",    ATTN),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv", WHOLE),
    ("encoder.mid.block_1",            "encoder.mid_block.resnets.0",               RESNET),
    ("encoder.mid.attn_1",             "encoder.mid_block.attentions.0",            ATTN),
    ("encoder.mid.block_2",            "encoder.mid_block.resnets.1",               RESNET),
    ("encoder.norm_out",               "encoder.conv_norm_out",                     WHOLE),
    ("encoder.conv_out",               "encoder.conv_out",                          WHOLE),
    ("quant_conv",                     "quant_conv",                                WHOLE),
    ("post_quant_conv",                "post_quant_conv",                           WHOLE),
    ("decoder.conv_in",                "decoder.conv_in",                           WHOLE),
    ("decoder.mid.block_1",            "decoder.mid_block.resnets.0",               RESNET),
    ("decoder.mid.attn_1",             "decoder.mid_block.attentions.0",            ATTN),
    ("decoder.mid.block_2",            "decoder.mid_block.resnets.1",               RESNET),
    ("decoder.up.{i}.block.{j}",       "decoder.up_blocks.{u}.resnets.{j}",         RESNET),
    ("decoder.up.{i}.attn.{j}",        "decoder.up_blocks.{u}.attentions.{j}",      ATTN),
    ("decoder.up.{i}.upsample.conv",   "decoder.up_blocks.{u}.upsamplers.0.conv",   WHOLE),
    ("decoder.norm_out",               "decoder.conv_norm_out",                     WHOLE),
    ("decoder.conv_out",               "decoder.conv_out",                          WHOLE),
]
# The VQ codebook is a whole key on both sides (ours is a tensor attribute, theirs an nn.Embedding).
CODEBOOK = ("quantizer.embed", "quantize.embedding.weight")
# Our VQ training state that diffusers does not keep: on import it starts as a fresh model's would.
VQ_TRAINING_STATE = ("quantizer.cluster_size", "quantizer.embed_sum", "quantizer.initted",
                     "quantizer.unused_steps", "quantizer.restarts")


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template)
    for name in "iju":
        body = body.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)")
    return re.compile(body + r"\.(?P<rest>.+)")


def _compile(to_diffusers: bool):
    compiled = []
    for ours, theirs, parts in RULES:
        src, dst = (ours, theirs) if to_diffusers else (theirs, ours)
        if parts is not None and not to_diffusers:
            parts = {v: k for k, v in parts.items()} | (LEGACY_ATTN if parts is ATTN else {})
        compiled.append((_pattern(src), dst, parts))
    return compiled


_TO_DIFFUSERS, _FROM_DIFFUSERS = _compile(True), _compile(False)


def _is_attn_matrix(ours_key: str) -> bool:
    """An attention projection weight: `o i 1 1` here, `o i` in diffusers."""
    return bool(re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", ours_key))


def rename(key: str, num_levels: int, to_diffusers: bool = True) -> str:
    """One state-dict key in the other naming; a key with no counterpart is a DiffusersError."""
    if key == CODEBOOK[0 if to_diffusers else 1]:
        return CODEBOOK[1 if to_diffusers else 0]
    for pattern, dst, parts in _TO_DIFFUSERS if to_diffusers else _FROM_DIFFUSERS:
        m = pattern.fullmatch(key)
        if not m:
            continue
        found = {k: int(v) for k, v in m.groupdict().items() if k != "rest" and v is not None}
        # {i} and {u} name the same level counted from either end: fill in the one not matched.
        if "i" in found:
            found["u"] = num_levels - 1 - found["i"]
        elif "u" in found:
            found["i"] = num_levels - 1 - found["u"]
        rest = m["rest"]
        if parts is not None:
            name, _, tail = rest.rpartition(".")
            if name not in parts:
                break
            rest = f"{parts[name]}.{tail}"
        return f"{dst.format(**found)}.{rest}"
    side = "diffusers" if to_diffusers else "our"
    raise DiffusersError(f"{key}: no {side} name for this tensor (not an arch=ldm autoencoder weight)")


def num_levels_of(keys, prefix: str) -> int:
    """Resolution levels, counted from the decoder's up blocks (`decoder.up.` or `decoder.up_blocks.`)."""
    levels = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    if not levels:
        raise DiffusersError(f"no {prefix}* tensors: not an autoencoder with a latent-diffusion decoder")
    return max(levels) + 1


def state_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our arch=ldm state dict -> diffusers names and shapes (fp32, contiguous). VQ training state is dropped."""
    n = num_levels_of(state, "decoder.up.")
    out = {}
    for k, v in state.items():
        if k in VQ_TRAINING_STATE:
            continue
        if _is_attn_matrix(k):
            v = rearrange(v, "o i 1 1 -> o i")
        out[rename(k, n, to_diffusers=True)] = (v.float() if v.is_floating_point() else v).contiguous()
    return out


def is_diffusers_state(state) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state)


def state_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL / VQModel state dict -> our names and shapes.

    A model without quant_conv / post_quant_conv (SD3 and FLUX VAEs: use_quant_conv false) gets
    identity 1x1 convs in their place, so it computes exactly the same and fits our arch=ldm model."""
    n = num_levels_of(state, "decoder.up_blocks.")
    out = {}
    for k, v in state.items():
        ours = rename(k, n, to_diffusers=False)
        if _is_attn_matrix(ours) and v.ndim == 2:
            v = rearrange(v, "o i -> o i 1 1")
        out[ours] = v
    if "quant_conv.weight" not in out:
        out |= _identity_conv("quant_conv", out["encoder.conv_out.weight"].shape[0], out["encoder.conv_out.weight"])
    if "post_quant_conv.weight" not in out:
        out |= _identity_conv("post_quant_conv", out["decoder.conv_in.weight"].shape[1], out["decoder.conv_in.weight"])
    return out


def _identity_conv(name: str, channels: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
    eye = rearrange(torch.eye(channels, dtype=like.dtype), "o i -> o i 1 1")
    return {f"{name}.weight": eye, f"{name}.bias": torch.zeros(channels, dtype=like.dtype)}


def fill_training_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the VQ training state our model keeps and diffusers does not (EMA statistics, code
    counters), as a freshly built model has it, with the imported codebook counted as initialised
    (else the first training step would re-initialise it by k-means and throw it away).

    A codebook of another shape than `own`'s is left as it is, with the fresh model's state beside
    it: the caller's shape check then names it (quantizer.embed) in one line."""
    state = dict(state)
    for k in VQ_TRAINING_STATE:
        if k in own and k not in state:
            state[k] = own[k].clone()
    if "quantizer.initted" in own:
        state["quantizer.initted"] = torch.ones_like(own["quantizer.initted"])
    embed = state.get("quantizer.embed")
    if "quantizer.embed_sum" in own and embed is not None and embed.shape == own["quantizer.embed_sum"].shape:
        state["quantizer.embed_sum"] = embed.float() * state["quantizer.cluster_size"][:, None]
    return state


# ---------------------------------------------------------------------------------------------
# Configs: ours -> diffusers, diffusers -> our model keys
# ---------------------------------------------------------------------------------------------


def check_exportable(m, model: torch.nn.Module | None = None) -> None:
    """One-line DiffusersError when a `ModelConfig` (and its built model) has no diffusers equivalent."""
    def refuse(why: str):
        raise DiffusersError(f"cannot export to diffusers: {why}")

    if m.arch != "ldm":
        refuse(f"model.arch={m.arch}: diffusers' autoencoders are the latent-diffusion network (arch=ldm) only")
    if m.kind == "prior":
        refuse(f"model.kind=prior: a prior is a transformer over a VQ model's codes, not an autoencoder; export its "
               f"VQ model instead (model.prior_vq={m.prior_vq})")
    if m.kind == "fsq":
        refuse("model.kind=fsq: diffusers has AutoencoderKL (kind=kl) and VQModel (kind=vq), no FSQ model")
    if m.kind not in CLASSES:
        refuse(f"model.kind={m.kind}: not an autoencoder; diffusers has AutoencoderKL (kind=kl) and VQModel (kind=vq)")
    if m.condition != "none":
        refuse(f"model.condition={m.condition}: diffusers' {CLASSES[m.kind]} takes no condition")
    if m.attn_type == "linear":
        refuse("model.attn_type=linear: diffusers' VAE attention is softmax attention (vanilla) only")
    if not m.resamp_with_conv:
        refuse("model.resamp_with_conv=false: diffusers' VAE resamples with convolutions only")
    if m.ch_mult[0] != 1:
        refuse(f"model.ch_mult[0]={m.ch_mult[0]}: diffusers' conv_in emits the first level's width, so it must be 1")
    if m.kind == "kl" and not m.double_z:
        refuse("model.double_z=false: diffusers' AutoencoderKL always has a Gaussian posterior (mean and logvar)")
    if m.kind == "kl" and m.embed_dim != m.z_channels:
        refuse(f"model.embed_dim={m.embed_dim} != model.z_channels={m.z_channels}: diffusers' quant_conv keeps "
               "the latent width (latent_channels)")
    if m.kind == "vq" and m.vq_cosine:
        refuse("model.vq_cosine=true: diffusers' VectorQuantizer looks codes up by Euclidean distance")
    if model is not None and getattr(getattr(model, "decoder", None), "tanh_out", False):
        refuse("the decoder ends in tanh, which diffusers' Decoder has no switch for")


def attention_levels(m) -> set[int]:
    """Levels (0 = full size) with attention blocks besides the middle ones."""
    if m.attn_type == "none" or not m.attn_resolutions:
        return set()
    sizes = [m.resolution // 2**i for i in range(len(m.ch_mult))]
    return {i for i, s in enumerate(sizes) if s in m.attn_resolutions}


def diffusers_config(m, *, sample_size: int, scaling_factor: float = 1.0, shift_factor: float | None = None,
                     latents_mean: list[float] | None = None, latents_std: list[float] | None = None) -> dict:
    """The `config.json` of the diffusers model equivalent to `ModelConfig` m (check_exportable first).

    scaling_factor stays 1.0 unless measured (harness/latents.py): diffusers' default 0.18215 is
    SD's VAE's. VQModel's config has no shift_factor or latents_mean/std: they are left out there."""
    check_exportable(m)
    levels = attention_levels(m)
    n = len(m.ch_mult)
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:
        version = DIFFUSERS_VERSION
    cfg = {
        "_class_name": CLASSES[m.kind],
        "_diffusers_version": version,
        "in_channels": m.in_channels,
        "out_channels": m.out_ch,
        "down_block_types": [("AttnDownEncoderBlock2D" if i in levels else "DownEncoderBlock2D") for i in range(n)],
        "up_block_types": [("AttnUpDecoderBlock2D" if n - 1 - u in levels else "UpDecoderBlock2D") for u in range(n)],
        "block_out_channels": [m.ch * c for c in m.ch_mult],
        "layers_per_block": m.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": m.z_channels,
        "norm_num_groups": m.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": m.attn_type != "none",
    }
    if m.kind == "kl":
        cfg |= {"shift_factor": shift_factor, "latents_mean": latents_mean, "latents_std": latents_std,
                "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True}
    else:
        cfg |= {"num_vq_embeddings": m.vq_codebook_size, "vq_embed_dim": m.embed_dim, "norm_type": "group",
                "lookup_from_codebook": False, "force_upcast": False}
    return cfg


def model_keys(cfg: dict) -> dict:
    """Our `model.*` keys for a diffusers AutoencoderKL / VQModel `config.json` (as a dict).

    A config with no arch=ldm equivalent is a one-line DiffusersError."""
    name = cfg.get("_class_name", "AutoencoderKL")
    kind = {v: k for k, v in CLASSES.items()}.get(name)

    def refuse(why: str):
        raise DiffusersError(f"diffusers {name}: {why}")

    if kind is None:
        refuse(f"not one of {', '.join(CLASSES.values())}")
    channels = list(cfg.get("block_out_channels", [64]))
    down = list(cfg.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(cfg.get("up_block_types", ["UpDecoderBlock2D"]))
    n = len(channels)
    if len(down) != n or len(up) != n:
        refuse(f"{len(down)} down and {len(up)} up blocks for {n} block_out_channels")
    if cfg.get("act_fn", "silu") != "silu":
        refuse(f"act_fn={cfg['act_fn']}: our blocks use silu")
    if cfg.get("norm_type", "group") != "group":
        refuse(f"norm_type={cfg['norm_type']}: our decoder has no spatial (MoVQ) norm")
    if any(c % channels[0] for c in channels):
        refuse(f"block_out_channels={channels}: each must be a multiple of the first (our ch * ch_mult)")
    known = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True,
             "UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
    if any(t not in known for t in down + up):
        refuse(f"block types {sorted(set(down + up) - set(known))}: not a latent-diffusion encoder/decoder")
    enc_attn = {i for i, t in enumerate(down) if known[t]}
    dec_attn = {n - 1 - u for u, t in enumerate(up) if known[t]}
    if enc_attn != dec_attn:
        refuse("attention at different levels in encoder and decoder: ours places it at the same levels in both")
    mid_attn = cfg.get("mid_block_add_attention", True)
    if enc_attn and not mid_attn:
        refuse("attention blocks without mid-block attention: ours always has it where attention is on")
    latent = cfg.get("latent_channels", 4)
    keys = {
        "kind": kind,
        "arch": "ldm",
        "in_channels": cfg.get("in_channels", 3),
        "out_ch": cfg.get("out_channels", 3),
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": cfg.get("layers_per_block", 1),
        "z_channels": latent,
        "norm_groups": cfg.get("norm_num_groups", 32),
        "attn_type": "vanilla" if mid_attn else "none",
        "condition": "none",
        "resamp_with_conv": True,
    }
    if enc_attn:
        size = cfg.get("sample_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        keys |= {"resolution": size, "attn_resolutions": [size // 2**i for i in sorted(enc_attn)]}
    else:  # said, so that a config setting them learns to drop them
        keys["attn_resolutions"] = []
    if kind == "kl":
        keys |= {"embed_dim": latent, "double_z": True}
    else:
        keys |= {"embed_dim": cfg.get("vq_embed_dim") or latent, "vq_codebook_size": cfg.get("num_vq_embeddings", 256),
                 "vq_cosine": False}
    return keys


def overrides(keys: dict) -> str:
    """`model.k=v ...` for the command line (lists without spaces, so the shell keeps each whole)."""
    def fmt(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ",".join(map(str, v)) + "]"
        return str(v)

    return " ".join(f"model.{k}={fmt(v)}" for k, v in keys.items())


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


def is_diffusers_folder(path: str | Path) -> bool:
    """A folder that looks like a diffusers model or pipeline (it may still be unreadable)."""
    path = Path(path)
    return path.is_dir() and ((path / CONFIG_NAME).is_file() or (path / "model_index.json").is_file()
                              or any((path / s / CONFIG_NAME).is_file() for s in SUBFOLDERS))


def resolve_folder(path: str | Path) -> Path:
    """The autoencoder folder of a diffusers model folder or pipeline (its vae/ or vqvae/)."""
    path = Path(path)
    for folder in [path, *(path / s for s in SUBFOLDERS)]:
        if (folder / CONFIG_NAME).is_file():
            return folder
    raise DiffusersError(f"{path}: a diffusers pipeline without a vae/ or vqvae/ folder holding {CONFIG_NAME}")


def read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusersError(f"{folder / CONFIG_NAME}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") not in CLASSES.values():
        got = cfg.get("_class_name") if isinstance(cfg, dict) else type(cfg).__name__
        raise DiffusersError(f"{folder / CONFIG_NAME}: a {got}, not one of {', '.join(CLASSES.values())}")
    return cfg


def load_folder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """(our state dict, the diffusers config, the folder read) from a diffusers model or pipeline folder."""
    from safetensors.torch import load_file

    folder = resolve_folder(path)
    cfg = read_config(folder)
    for name in (WEIGHTS_NAME, *OTHER_WEIGHTS):
        if (folder / name).is_file():
            file = folder / name
            break
    else:
        raise DiffusersError(f"{folder}: has {CONFIG_NAME} but no {WEIGHTS_NAME} (nor {', '.join(OTHER_WEIGHTS)})")
    try:
        if file.suffix == ".safetensors":
            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise DiffusersError(f"{file}: cannot read weights ({load_reason(e)})") from None
    if (why := state_dict_problem(state)) is not None:
        raise DiffusersError(f"{file}: {why}")
    try:
        return state_from_diffusers(state), cfg, folder
    except DiffusersError as e:  # a tensor with no name of ours: say which file
        raise DiffusersError(f"{file}: {e}") from None


def save_folder(model: torch.nn.Module, m, out: str | Path, **config) -> tuple[Path, dict]:
    """Write `model` (built from ModelConfig m) as a diffusers folder: config.json + safetensors.

    `config`: diffusers_config's keyword arguments (sample_size, scaling_factor, ...)."""
    from harness.export import save_safetensors

    check_exportable(m, model)
    cfg = diffusers_config(m, **config)
    state = state_to_diffusers(model.state_dict())
    out = Path(out)
    save_safetensors(state, out / WEIGHTS_NAME, {"format": "pt"})
    write_atomic(out / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")
    return out, cfg


def check_loads(folder: str | Path, model: torch.nn.Module, image_size: int) -> float | None:
    """Load `folder` with diffusers (when installed) and return the largest difference between its
    reconstruction of a random image and `model`'s (posterior mean / quantized latent -> decode).
    None when diffusers is not installed. Missing or unexpected keys are a DiffusersError."""
    try:
        import diffusers
    except ImportError:
        return None
    import logging

    folder = Path(folder)
    cls = getattr(diffusers, read_config(folder)["_class_name"])
    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # diffusers' logger does not propagate
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        theirs = cls.from_pretrained(folder).eval()
    finally:
        logger.removeHandler(handler)
    said = [s for s in said if "weights" in s or "keys" in s]
    if said:
        raise DiffusersError(f"{folder}: diffusers loads it with a warning: {' '.join(said[0].split())[:300]}")
    noise = torch.rand(1, theirs.config.in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    x = noise * 2 - 1
    model = model.eval()
    with torch.no_grad():
        ours = model.decode(model.encode(x))
        encoded = theirs.encode(x)
        latent = encoded.latents if hasattr(theirs, "quantize") else encoded.latent_dist.mode()
        out = theirs.decode(latent).sample  # VQModel.decode quantizes its input, as our encode does
    return float((ours.float() - out.float()).abs().max())
