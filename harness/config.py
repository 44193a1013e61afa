"""The typed config: one schema, YAML files that compose, `key.sub=value` overrides.

Precedence is command line > later YAML file > earlier YAML file > defaults. A YAML file may
name others it builds on with a top-level `base:` (a path or a list, relative to that file).

Every field has a default and a help line (its unit, and what disables it). Validation runs once,
at start-up: an unknown key, a wrong type or a bad value raises `ConfigError` whose message is one
line naming the key path and what is allowed; `launch/train.py` prints it and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from shards.sources import weighted_items


class ConfigError(ValueError):
    """A user error in the config: the message is one line that names the key path."""


def F(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
      lt: float | None = None):
    """A config field with its help line and optional bounds (checked at load time)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Read by the class models/registry.py registers for `kind`, which also checks it. The keys stay
    flat, one section for every kind: checkpoints hash this section, so renaming or nesting a key
    would refuse every earlier run's resume."""

    # --- what the latent is, and what builds encoder and decoder
    kind: str = F(
        "kl", "what to build, a kind models/registry.py registers: kl = Gaussian VAE, vq = vector-quantized "
        "(codebook), fsq = finite scalar quantization, classifier / rotnet = the perception network, prior = a "
        "transformer over a VQ/FSQ run's codes (model.prior_vq)"
    )
    arch: Literal["ldm", "spec"] = F(
        "ldm", "encoder/decoder: ldm = latent-diffusion Encoder/Decoder (ch, ch_mult...), spec = model.encoder/decoder"
    )
    encoder: str | list[str] = F(
        "", "arch=spec: encoder layer strings, or a .json/.yaml path (a list, or a mapping with an `encoder` list; "
        "replaced by its layers at load)"
    )
    decoder: str | list[str] = F(
        "", "arch=spec: decoder layer strings or path ('' = the layers after `Latent` in model.encoder, or the "
        "`decoder` list of model.encoder's file)"
    )
    in_channels: int = F(3, "image channels in (training: 3, the loader's RGB)", ge=1)
    out_ch: int = F(3, "image channels out (training: 3, the loader's RGB)", ge=1)
    # --- arch=ldm
    ch: int = F(128, "base channel count of encoder/decoder", ge=1)
    ch_mult: list[int] = F([1, 2, 4, 4], "channel multiplier per resolution level; len-1 = number of 2x downsamplings")
    num_res_blocks: int = F(2, "residual blocks per resolution level", ge=1)
    attn_resolutions: list[int] = F([], "feature-map sizes (pixels) that get an attention block; [] = none")
    resolution: int = F(0, "image size attn_resolutions refer to (0 = data.image_size, filled in at load)", ge=0)
    z_channels: int = F(4, "latent channels (before embed_dim projection)", ge=1)
    # --- both archs
    attn_type: Literal["vanilla", "linear", "none"] = F(
        "vanilla", "attention kind in mid and attn_resolutions blocks (and VAEA spec items; none = identity)"
    )
    norm_groups: int = F(32, "GroupNorm groups in residual/attention blocks (channels must be divisible)", ge=1)
    double_z: bool = F(True, "kind=kl: encoder emits mean and log-variance (2*z); false = deterministic (KL 0)")
    embed_dim: int = F(4, "channels of the latent the decoder reads (kl; vq: codebook vector size)", ge=1)
    dropout: float = F(0.0, "dropout in residual blocks (0 = off)", ge=0.0, le=1.0)
    resamp_with_conv: bool = F(True, "strided conv / conv after nearest upsampling (false = pooling / plain)")
    gradient_checkpointing: bool = F(False, "recompute residual and attention blocks in backward")
    # --- conditioning
    condition: Literal["none", "class", "multilabel"] = F(
        "none", "condition: class = class index (cls), multilabel = multi-hot vector (COCO categories)"
    )
    num_classes: int = F(0, "number of classes (class) or label-vector length (multilabel, 80 for COCO)", ge=0)
    cond_dim: int = F(64, "condition embedding width: extra input channels of encoder/decoder, FiLM input", ge=1)
    cond_dropout: float = F(
        0.0, "share of training samples given the null condition, so the model also samples unconditionally (0 = off)",
        ge=0.0, le=1.0,
    )
    # --- kind=vq
    vq_codebook_size: int = F(1024, "codebook entries (at most 2^20: k-means seeding and usage counts grow with it)",
                              ge=2, le=2**20)
    vq_beta: float = F(0.25, "commitment weight on the encoder term |z_e - sg(e)|^2", ge=0.0)
    vq_decay: float = F(0.99, "EMA decay of the codebook, < 1 (0 = codebook trained by gradient)", ge=0.0)
    vq_eps: float = F(1e-5, "Laplace smoothing of EMA cluster sizes", gt=0.0)
    vq_cosine: bool = F(False, "l2-normalise encoder outputs and codes (cosine-similarity lookup)")
    vq_init: Literal["kmeans", "random", "none"] = F(
        "kmeans", "codebook init from the first training batch: kmeans = k-means++ seeding + Lloyd steps, "
        "random = random encoder outputs, none = random normal"
    )
    vq_restart_after: int = F(
        100, "replace codes unused for this many training forwards (micro-batches, not optimizer steps) "
        "by recent encoder outputs (0 = never)", ge=0
    )
    # --- kind=fsq
    fsq_levels: list[int] = F([8, 5, 5, 5], "FSQ levels per latent channel; codebook size = their product")
    # --- kind=prior (an autoregressive transformer over a frozen VQ/FSQ model's codes)
    prior_vq: str = F("", "kind=prior: the frozen VQ or FSQ run, checkpoint or export folder whose codes are modelled "
                          "(its EMA weights when it kept an EMA); read again at every start and resume")
    prior_layers: int = F(6, "kind=prior: transformer blocks", ge=1)
    prior_dim: int = F(256, "kind=prior: transformer width (token, position and condition embeddings)", ge=8)
    prior_heads: int = F(8, "kind=prior: attention heads (prior_dim must be divisible)", ge=1)
    prior_dropout: float = F(0.0, "kind=prior: dropout on embeddings, attention and MLP outputs (0 = off)",
                             ge=0.0, lt=1.0)
    prior_codebook_size: int = F(0, "kind=prior: codes per position, derived from prior_vq (0 = not yet; FSQ: the "
                                    "product of its levels)", ge=0)
    prior_grid: list[int] = F([], "kind=prior: the [h, w] code grid at data.image_size, derived from prior_vq "
                                  "([] = not yet)")


@dataclass
class DataConfig:
    train: str | list[str] = F(
        "", "training shards: brace pattern (dir/{000000..000009}.tar), a folder of shards, or a list"
    )
    val: str | list[str] = F("", "held-out shards for evaluation and reconstruction grids ('' = none)")
    image_size: int = F(64, "square training resolution in pixels", ge=8, le=16384)
    crop: Literal["random", "center"] = F("random", "crop before resizing to image_size (center for eval)")
    hflip: bool = F(False, "random horizontal flips")
    num_workers: int = F(2, "DataLoader worker processes per rank (0 = load in the training process)", ge=0)
    shuffle_buffer: int = F(1000, "samples in each worker's shuffle buffer (0 = no shuffle)", ge=0)
    epoch_samples: int = F(0, "samples per epoch over all ranks (0 = dataset size from the shard index)", ge=0)
    num_samples: int = F(0, "dataset size when shards carry no index or _stats.json (0 = read it from them)", ge=0)
    seed: int = F(0, "data seed: shard order, shuffling and crops are deterministic in it")
    max_bad_fraction: float = F(0.1, "stop when more than this share of samples read are bad (1 = never)",
                                ge=0.0, le=1.0)
    min_bad_samples: int = F(100, "bad samples tolerated before max_bad_fraction is applied", ge=0)
    max_pixels: int = F(64_000_000, "images with more pixels (width x height, read from the header before "
                                     "decoding) are bad samples (0 = no limit)", ge=0)


@dataclass
class LossConfig:
    recon: Literal["l1", "l2", "bce"] = F(
        "l1", "pixel reconstruction loss: l1, l2, or bce (binary cross-entropy of images mapped to [0, 1])"
    )
    recon_weight: float = F(1.0, "weight of the pixel reconstruction term", ge=0.0)
    learned_logvar: bool = F(False, "latent-diffusion's learned scalar log-variance: (recon + perceptual) becomes the "
                                    "NLL rec / exp(logvar) + logvar, logvar trained with the model (loss.logvar)")
    logvar_init: float = F(0.0, "initial value of the learned log-variance (loss.learned_logvar); its optimum is "
                                "log(rec), about -5 to 0 for images in [-1, 1]", ge=-20.0, le=20.0)
    kl_weight: float = F(1e-6, "weight of the KL term of a Gaussian posterior (0 = plain autoencoder)", ge=0.0)
    kl_anneal_steps: int = F(0, "KL warm-up: the KL weight rises linearly from 0 to kl_weight over this many "
                                "optimizer steps (0 = full weight from the start)", ge=0)
    kl_anneal_cycle: int = F(0, "cyclical KL annealing: restart the warm-up every this many steps (0 = warm up "
                                "once; must be >= kl_anneal_steps)", ge=0)
    kl_free_bits: float = F(0.0, "free bits: KL floor in nats per latent channel (batch mean, summed over positions), "
                                 "as in Kingma et al. 2016 (0 = off)", ge=0.0)
    vq_weight: float = F(1.0, "weight of the vector-quantizer term (codebook + vq_beta * commitment)", ge=0.0)
    ssim_weight: float = F(0.0, "weight of 1 - SSIM(recon, input) (11-tap Gaussian window, sigma 1.5; 0 = off)", ge=0.0)
    msssim_weight: float = F(0.0, "weight of 1 - MS-SSIM(recon, input): 5 scales, Wang et al. 2003 weights; "
                                  "fewer scales (weights renormalised) on images under 176 px (0 = off)", ge=0.0)
    tv_weight: float = F(
        0.0, "weight of the reconstruction's total variation, mean |neighbour difference| rows + columns (0 = off)",
        ge=0.0,
    )
    sparsity_weight: float = F(0.0, "weight of the L1 sparsity of the latent the decoder reads, mean |z| (0 = off)",
                               ge=0.0)
    perceptual_weight: float = F(
        0.0, "weight of the perceptual distance from the frozen network loss.perceptual picks (0 = off)", ge=0.0
    )
    perceptual: Literal["net", "lpips"] = F(
        "net", "perceptual network: net = the project's own (loss.perceptual_net), lpips = LPIPS(vgg) from "
        "loss.lpips_vgg and loss.lpips_lin"
    )
    perceptual_net: str = F(
        "", "perception network file from launch/train_perception.py (perception.safetensors); "
        "needed when perceptual_weight > 0 and perceptual=net"
    )
    lpips_vgg: str = F(
        "", "torchvision's VGG16 weights (vgg16-397923af.pth) for LPIPS ('' = look in $TORCH_HOME/hub/checkpoints "
        "and ~/.cache/torch/hub/checkpoints)"
    )
    lpips_lin: str = F(
        "", "LPIPS v0.1 linear heads (lpips/weights/v0.1/vgg.pth) ('' = the installed lpips package's file, "
        "found without importing it)"
    )
    disc_weight: float = F(0.0, "weight of the adversarial term from a patch discriminator, as in latent-diffusion "
                                "(0 = no discriminator; 0.5 typical)", ge=0.0)
    disc_start: int = F(0, "optimizer step at which the discriminator starts training and judging (latent-"
                           "diffusion waits until the reconstructions are decent, e.g. 50001)", ge=0)
    disc_loss: Literal["hinge", "vanilla"] = F("hinge", "discriminator loss: hinge or vanilla (softplus)")
    disc_layers: int = F(3, "strided layers of the PatchGAN discriminator (3 = 70x70-pixel patches)", ge=1, le=6)
    disc_channels: int = F(64, "channels of the discriminator's first layer (doubling, at most 8x)", ge=1)
    disc_lr: float = F(0.0, "discriminator learning rate, Adam betas (0.5, 0.9), constant (0 = optim.lr)", ge=0.0)
    disc_adaptive: bool = F(True, "scale the adversarial term by |grad of the reconstruction terms| / |grad of it| "
                                  "at the decoder's last layer (latent-diffusion's adaptive weight)")
    disc_adaptive_max: float = F(1e4, "upper clamp of the adaptive weight: 1e4 as taming-transformers (losses are "
                                      "means over pixels in both); latent-diffusion sums over pixels, so its 1e4 is "
                                      "1e4 / (3 * image_size^2) here (0.05086 at 256 px)", gt=0.0)
    disc_norm: Literal["batch", "sync_batch", "group"] = F(
        "batch", "discriminator normalisation: batch (per rank), sync_batch (statistics over all DDP ranks), "
        "group (GroupNorm, no batch statistics)"
    )
    lecam_weight: float = F(0.0, "LeCAM regularisation of the discriminator (Tseng et al. 2021), 0.001 typical "
                                 "(0 = off)", ge=0.0)
    lecam_decay: float = F(0.999, "EMA decay of the mean real/fake logits LeCAM anchors to", ge=0.0, lt=1.0)


@dataclass
class OptimConfig:
    lr: float = F(1e-4, "peak learning rate (AdamW)", gt=0.0)
    betas: list[float] = F([0.9, 0.999], "AdamW betas")
    weight_decay: float = F(0.0, "AdamW decoupled weight decay (0 = off)", ge=0.0)
    eps: float = F(1e-8, "AdamW epsilon", gt=0.0)
    warmup_steps: int = F(0, "linear warmup in optimizer steps (0 = none)", ge=0)
    schedule: Literal["cosine", "constant"] = F("cosine", "learning-rate schedule after warmup")
    min_lr_ratio: float = F(0.1, "cosine floor as a fraction of lr", ge=0.0, le=1.0)
    grad_clip: float = F(1.0, "max global gradient norm (0 = no clipping)", ge=0.0)
    fused: bool = F(False, "AdamW's fused kernel (CUDA, CPU); without an fp16 loss scaler or DeepSpeed it also makes "
                           "the step free of host syncs (a non-finite step is skipped on the device, counted at the "
                           "next log)")


@dataclass
class TrainConfig:
    max_steps: int = F(1000, "optimizer steps to train for", ge=1)
    batch_size: int = F(8, "samples per process per micro-step", ge=1)
    grad_accum: int = F(1, "micro-steps per optimizer step", ge=1)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = F(
        "auto", "autocast precision; auto = what `accelerate launch` / its config says"
    )
    seed: int = F(0, "seed for weights init and posterior sampling", ge=0, lt=2**31)
    ema_decay: float = F(0.0, "EMA of weights per optimizer step, warmed up as min(decay, (1+n)/(10+n)) "
                                "at update n=1,2,... (0 = off; 0.999 typical)", ge=0.0, lt=1.0)
    tf32: bool = F(True, "CUDA (Ampere+): TF32 for the fp32 matmuls and convolutions (false = full fp32)")
    channels_last: bool | Literal["auto"] = F(
        "auto", "training batches in channels_last (NHWC) memory, as the loader delivers them, so the convolutions "
        "run NHWC throughout (1.06x on the fp32 CPU step); false = NCHW; auto = NHWC except on CPU under bf16, "
        "where NCHW is faster (1.08-1.32x) (validation, grids and the tools take the loader's layout either way)")
    cpu_kernels: bool = F(True, "CPU: GroupNorm + SiLU on channels_last fp32 tensors as one fused kernel "
                                "(models/cpu_kernels.py: built on first use with the machine's C compiler, "
                                "torch's ops where it cannot be; 1.05-1.12x on the CPU step); false = torch's ops")
    max_nonfinite: int = F(10, "consecutive non-finite losses before the run stops", ge=1)
    stop_after_steps: int = F(0, "end this invocation (with a checkpoint) after N steps, for time-sliced jobs "
                                 "(0 = off)", ge=0)
    init_from: str = F("", "start a new run from these weights: a run, step_N or export folder, or a .safetensors/"
                           ".ckpt/.pt/.pth/.bin file (latent-diffusion checkpoints: first_stage_model. and loss. "
                           "handled); every tensor must fit the model; ignored when resuming")


@dataclass
class CheckpointConfig:
    every_steps: int = F(500, "save every N optimizer steps (0 = only at the end and on signals)", ge=0)
    keep_last: int = F(3, "complete checkpoints kept (older ones pruned after a new one is complete)", ge=1)


@dataclass
class LogConfig:
    every_steps: int = F(10, "scalars to TensorBoard and the text log every N steps", ge=1)
    images_every_steps: int = F(200, "image grids every N steps (0 = only at the end)", ge=0)
    num_images: int = F(8, "images per grid row", ge=1)
    class_rows: int = F(10, "rows (classes or labels) in the per-class sample grid of conditional models, and the "
                            "first classes validation logs val/psnr_class/<name> for (0 = none; evaluate.py: all)",
                        ge=0)
    interpolation_rows: int = F(2, "rows of latent interpolations between grid images (0 = none)", ge=0)
    progress: bool = F(True, "progress bar on rank 0")
    eval_samples: int = F(512, "model.kind=classifier: samples of data.val (else data.train) the final accuracy "
                               "in perception.json is measured on", ge=1)


@dataclass
class EvalConfig:
    every_steps: int = F(0, "validate on data.val every N optimizer steps (0 = off): val/* in TensorBoard", ge=0)
    samples: int = F(512, "held-out samples per validation, over all ranks (the first N of data.val; 0 = all)",
                     ge=0)
    batch_size: int = F(0, "samples per process per validation batch (0 = train.batch_size)", ge=0)
    ema: bool = F(True, "validate the EMA weights when train.ema_decay > 0 (false = the trained weights)")
    best_metric: str = F("psnr", "keep checkpoints/best by this val metric (psnr, ssim: higher is better; l1, mse, "
                                 "the model's terms (kl, vq), lpips, rfid, fd_<net>: lower) ('' = no best checkpoint)")
    lpips: bool = F(False, "also measure val/lpips with LPIPS(vgg) (weights: loss.lpips_vgg / loss.lpips_lin, "
                           "else the torch hub cache and the installed lpips package)")
    fid_weights: str = F("", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth: val/rfid, FID of reconstructions "
                             "against their inputs ('' = off)")
    fd_net: str = F("", "a perception.safetensors (launch/train_perception.py): val/fd_<file stem>, the Frechet "
                        "distance in its feature space (never called FID; '' = off)")


@dataclass
class RunConfig:
    dir: str = F("runs/default", "run folder: config.yaml, tb/, checkpoints/, latest, samples/, train.log")


IMAGE_CHANNELS = 3  # what harness/data.py delivers: every image is decoded to RGB


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self, *, training: bool = True) -> None:
        """Cross-field checks (single fields are checked while loading). `training` (`load_config`, at
        start-up) adds what training and validating on this harness's data needs of the model (its
        image channels, its batch size); a stored config (`from_dict`) describes a model to load, for
        export or inspection, and is not held to it."""
        if not self.data.train:
            raise ConfigError("data.train: missing; give a shard pattern, a folder of shards or a list")
        if not self.run.dir.strip():
            raise ConfigError("run.dir: empty; name the run folder (the default is runs/default)")
        if training and self.run.dir.startswith("~"):  # as a shell would (YAML and key=value do not): not ./~/x
            self.run.dir = os.path.expanduser(self.run.dir)
        if self.eval.every_steps and not self.data.val:
            raise ConfigError("eval.every_steps: validation needs held-out shards in data.val")
        if training:
            self._validate_val_weights()
        if len(self.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ConfigError(f"optim.betas: need two numbers in [0, 1); got {self.optim.betas}")
        if self.loss.perceptual_weight > 0 and self.loss.perceptual == "lpips" and self.model.out_ch != 3:
            raise ConfigError(f"loss.perceptual: lpips compares RGB images but the model makes {self.model.out_ch} "
                              "channels (model.out_ch); use loss.perceptual=net with a net trained on them")
        if training:  # before the model's own checks: a spec's shapes would blame its layers, not the channels
            self._validate_channels()
        self._validate_model()
        if training:
            self._validate_batch()
        if 0 < self.loss.kl_anneal_cycle < self.loss.kl_anneal_steps:
            raise ConfigError(f"loss.kl_anneal_cycle: {self.loss.kl_anneal_cycle} is shorter than loss.kl_anneal_steps="
                              f"{self.loss.kl_anneal_steps}; the warm-up would never finish")
        if training:
            self._validate_loss_weights()
        if self.loss.perceptual_weight > 0 and self.loss.perceptual == "net" and not self.loss.perceptual_net:
            # The file itself is read when the loss is built (a stored config must load without it).
            raise ConfigError("loss.perceptual_net: loss.perceptual_weight > 0 needs the file written by "
                              "launch/train_perception.py (perception.safetensors)")

    def _validate_val_weights(self) -> None:
        """Validation reads data.val's samples once each, in order: a weight would be ignored without a word
        (and would not make a later source measured at all). Refused here, not at the first validation
        (harness/data.py eval_batches also refuses those inside a list file)."""
        if weighted := weighted_items(self.data.val):
            raise ConfigError(f"data.val: weights mean nothing for evaluation, which reads every sample once in "
                              f"order; drop the ::w ({weighted[0]})")

    def _validate_channels(self) -> None:
        """The data pipeline delivers 3-channel RGB images: a model that reads or makes other channel
        counts would fail mid-run (or, making 1, train on a broadcast loss without a word)."""
        from models import ModelConfigError, model_class  # here, not on top: --help-config needs no torch

        m = self.model
        try:
            reads = set(getattr(model_class(m.kind), "config_keys", ()))
        except ModelConfigError:
            return  # an unknown kind: _validate_model says so
        spec = m.arch == "spec"
        if "in_channels" in reads and m.in_channels != IMAGE_CHANNELS:
            layer = " and make the encoder's first layer read 3" if spec else ""
            raise ConfigError(f"model.in_channels: {m.in_channels}, but the data loader delivers {IMAGE_CHANNELS}-"
                              f"channel RGB images; set model.in_channels={IMAGE_CHANNELS}{layer}")
        if "out_ch" in reads and m.out_ch != IMAGE_CHANNELS:
            layer = " and make the decoder's last layer emit 3" if spec else ""
            raise ConfigError(f"model.out_ch: {m.out_ch}, but the model reconstructs the data loader's "
                              f"{IMAGE_CHANNELS}-channel RGB images; set model.out_ch={IMAGE_CHANNELS}{layer}")

    def _validate_loss_weights(self) -> None:
        """Weights that leave the autoencoder nothing to learn, or a learned term with nothing to balance,
        would train without an error and make garbage; and LPIPS needs images VGG16 can pool four times."""
        from models import ModelConfigError, model_class
        from models.lpips import MIN_SIZE

        loss = self.loss
        try:
            task = getattr(model_class(self.model.kind), "task", "autoencoder")  # as harness/tasks.py:make_task
        except ModelConfigError:
            return  # an unknown kind: _validate_model says so
        if task != "autoencoder":
            return  # classifiers and priors have their own objectives (harness/tasks.py)

        lpips = [k for k, on in (("loss.perceptual=lpips", loss.perceptual_weight > 0 and loss.perceptual == "lpips"),
                                 ("eval.lpips", self.eval.lpips and self.eval.every_steps > 0)) if on]
        if lpips and self.data.image_size < MIN_SIZE:
            raise ConfigError(f"{lpips[0]}: LPIPS(vgg) needs images of at least {MIN_SIZE} px a side "
                              f"(data.image_size={self.data.image_size})")
        compare = ("recon_weight", "perceptual_weight", "ssim_weight", "msssim_weight")
        if not any(getattr(loss, k) > 0 for k in compare):
            raise ConfigError("loss: no term compares the reconstruction with the input (loss.recon_weight, "
                              "perceptual_weight, ssim_weight and msssim_weight are all 0): the decoder would learn "
                              "nothing; set one of them above 0")
        if loss.recon_weight == 0 and loss.perceptual_weight == 0:
            if loss.learned_logvar:
                raise ConfigError("loss.learned_logvar: its NLL reads recon + perceptual, and loss.recon_weight and "
                                  "loss.perceptual_weight are both 0: logvar would fall without bound")
            if loss.disc_weight > 0 and loss.disc_adaptive:
                raise ConfigError("loss.disc_adaptive: the adaptive weight compares the adversarial gradient with "
                                  "that of recon + perceptual, both weighted 0, so it would be 0; set "
                                  "loss.recon_weight or loss.perceptual_weight, or loss.disc_adaptive=false")

    def _validate_batch(self) -> None:
        """A BatchNorm must see more than one value per channel in a training batch of one rank (torch
        refuses at the first step); walks the shapes the model's own checks accepted."""
        from models import batch_problem

        if (why := batch_problem(self.model, self.data.image_size, self.train.batch_size)) is not None:
            raise ConfigError(why)

    def _validate_model(self) -> None:
        """The model kind's own checks (models/registry.py), which may fill in derived keys
        (model.resolution, spec files read into layer lists). The one place where a model's
        `ModelConfigError` becomes a `ConfigError`."""
        from models import ModelConfigError, check_config  # here, not on top: --help-config needs no torch

        try:
            check_config(self.model, self.data.image_size)
        except ModelConfigError as e:
            raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Loading: YAML composition, overrides, type checks
# ---------------------------------------------------------------------------------------------


class _Override(str):
    """A value typed on the command line: parsed according to the field's type, not by YAML alone."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently:
    a second `train:` section would drop the first one's keys).

    Checked as each mapping is composed, before anything is constructed: merge keys (`<<: *base`)
    are SafeLoader's to expand, and the keys they bring in may be overridden by the mapping's own
    (that is what a merge is for); only keys written twice in the mapping itself are refused."""

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                continue  # `<<` (tag:yaml.org,2002:merge), numbers, booleans: as YAML reads them
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key_node.value!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key_node.value)
        return node


MAX_CONFIG_BYTES = 16 << 20


def _read_text(path: Path) -> str:
    """The text of config file `path` (a pipe too: `--config <(...)`), or a one-line ConfigError (missing, a
    folder, unreadable, endless)."""
    try:
        if path.is_dir():
            raise ConfigError(f"{path}: a folder, not a config file (a YAML file such as launch/configs/demo.yaml)")
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES >> 20} MB: not a config file")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (a config file is YAML text)") from None
    except OSError as e:  # no permission, an I/O error (`--config /proc/self/mem`), a name too long
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or type(e).__name__})") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    given = path  # read and named as given: a pipe's resolved name is /proc/<pid>/fd/pipe:[...]
    try:
        path = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    if path in seen:
        raise ConfigError(f"{path}: config files include each other ({' -> '.join(str(p) for p in seen + (path,))})")
    text = _read_text(given)
    try:
        raw = _unshared(yaml.load(text, Loader=_UniqueKeyLoader) or {})
    except ValueError as e:  # ours, from _unshared; an integer of more digits than Python converts
        raise ConfigError(f"{path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deep to be a config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(raw).__name__}")
    bases = raw.pop("base", None) or []
    if not (isinstance(bases, str) or isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{path}: base: {bases!r} is not a file name or a list of file names")
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        _deep_merge(merged, _read_yaml(path.parent / base, seen + (path,)))
    return _deep_merge(merged, raw)


MAX_CONFIG_NODES = 100_000  # values in one config file once its aliases are copied


def _unshared(x, inside: tuple[int, ...] = (), budget: list[int] | None = None):
    """A copy in which no dict or list appears twice: YAML aliases (`data: *train`) make one object of
    two sections, which an override of one would change in both (deepcopy keeps them shared). Refused:
    an alias of a node inside itself (`&a [*a]`), and aliases of aliases that copy into more than
    MAX_CONFIG_NODES values (a "billion laughs" file, a few lines long)."""
    budget = [MAX_CONFIG_NODES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"its aliases expand to more than {MAX_CONFIG_NODES} values")
    if not isinstance(x, (dict, list)):
        return x
    if id(x) in inside:
        raise ValueError("an alias refers to a node that contains it")
    inside += (id(x),)
    if isinstance(x, dict):
        return {k: _unshared(v, inside, budget) for k, v in x.items()}
    return [_unshared(v, inside, budget) for v in x]


def _deep_merge(into: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v
    return into


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"{item}: an override must look like key.sub=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{item}: an override must look like key.sub=value")
    if len(parts) == 1 and dataclasses.is_dataclass(typing.get_type_hints(Config).get(parts[0])):
        # A whole section (`train={batch_size: 2}`) is merged into what the files and earlier overrides
        # gave it, as a YAML file's mapping is: it used to replace the section, dropping their keys.
        try:
            mapping = yaml.safe_load(value)
        except (yaml.YAMLError, ValueError, RecursionError):
            mapping = None
        if not isinstance(mapping, dict):
            raise ConfigError(f"{item}: {parts[0]} is a section: give {parts[0]}.key=value, or a mapping "
                              f"{parts[0]}={{key: value, ...}}")
        if not isinstance(raw.get(parts[0]), dict):
            raw[parts[0]] = {}
        _deep_merge(raw[parts[0]], mapping)
        return
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = _Override(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _takes_list(tp: Any) -> bool:
    """Whether a field of type `tp` may hold a list."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_takes_list(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) is list


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Turn a YAML or command-line value into `tp`, or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if isinstance(value, _Override):
        text = str(value)
        if tp is str or (origin is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
            return _coerce(text, tp, path)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            value, problem = text, getattr(e, "problem", None) or type(e).__name__
        except (ValueError, RecursionError) as e:  # 5000 digits; [[[[... nested past the stack
            why = "nested too deep" if isinstance(e, RecursionError) else "a number of too many digits"
            raise ConfigError(f"{path}: {text[:40]}{'...' if len(text) > 40 else ''} is not a value ({why})") from None
        else:
            problem = f"it reads as a {type(value).__name__}"
        if text.strip().startswith("[") and text.strip().endswith("]") and not isinstance(value, list) and \
                _takes_list(tp):
            # Meant as a list: taken as one string it would be one strange item (a weight '1, b/...]').
            raise ConfigError(f"{path}=[...]: does not parse as a YAML list ({problem}); quote items holding {{}} "
                              f"braces or ', ': {path}=['a', 'b/{{000000..000003}}.tar']")
        if origin in (Union, types.UnionType) and str in typing.get_args(tp):
            # A string option takes the text as typed (a brace pattern is not a YAML mapping), unless
            # it reads as a list, whose item that is not a string is named.
            for option in typing.get_args(tp):
                if option is not str:
                    try:
                        return _coerce(value, option, path)
                    except ConfigError:
                        if isinstance(value, list) and typing.get_origin(option) is list:
                            raise
            return text
    bad = ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        lists = [o for o in typing.get_args(tp) if typing.get_origin(o) is list]
        if isinstance(value, list) and lists:  # the list's own error names the item that is wrong
            _coerce(value, lists[0], path)
        raise bad
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        else:
            number = float(value)
        # inf and nan pass every bound check (nan compares false both ways) and would only show up as a
        # non-finite loss later; no field gives them a meaning.
        if not math.isfinite(number):
            raise ConfigError(f"{path}: {value!r} is not a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise TypeError(f"config field {path} has an unsupported type {tp}")


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            if cls is Config and key in ("encoder", "decoder"):
                raise ConfigError(f"{where}: unknown key; this looks like a layer-spec file, not a config: pass it "
                                  "as model.encoder=FILE (with model.arch=spec)")
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown key; {hint}allowed: {', '.join(fields)}")
        value = _coerce(value, hints[key], where)
        meta = fields[key].metadata
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for bound, ok, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                                    ("le", lambda v, b: v <= b, "<="),
                                    ("lt", lambda v, b: v < b, "<")):
                b = meta.get(bound)
                if b is not None and not ok(value, b):
                    raise ConfigError(f"{where}: {value} is out of range; must be {text} {b}")
        kwargs[key] = value
    return cls(**kwargs)


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Compose YAML `files` (in order), apply `key.sub=value` overrides, type-check, validate (for
    training on this harness's data)."""
    raw: dict = {}
    for f in files:
        _deep_merge(raw, _read_yaml(Path(f)))
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "")
    cfg.validate(training=True)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(raw: dict) -> Config:
    """Rebuild a Config from a dict written by `to_dict` (a run folder's or checkpoint's config)."""
    cfg = _build(Config, raw, "")
    cfg.validate(training=False)  # a stored model, maybe loaded for export or inspection only
    return cfg


def section_hash(section: Any) -> str:
    """A short stable hash of one config section (the model's, to refuse mismatched resumes)."""
    blob = json.dumps(dataclasses.asdict(section), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: `key.path (type) = default  # help`, for --help-config."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], f"{key}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{key} ({_type_name(hints[f.name])}) = {default!r}  # {f.metadata.get('help', '')}")
    return lines


def unused_settings(cfg: Config) -> list[str]:
    """Settings that this run will never act on, each as one note for the log: accepted (a schedule may be
    lengthened at a resume, an eval section may be kept for later), but never silent."""
    notes = []
    if cfg.loss.disc_weight > 0 and cfg.loss.disc_start >= cfg.train.max_steps:
        notes.append(f"loss.disc_start={cfg.loss.disc_start} is at or past train.max_steps={cfg.train.max_steps}: "
                     "the discriminator will not train in this run (raise train.max_steps, or lower loss.disc_start)")
    if not cfg.eval.every_steps:
        named = [k for k in ("lpips", "fid_weights", "fd_net") if getattr(cfg.eval, k)]
        if named:
            notes.append(f"eval.{', eval.'.join(named)} set, but eval.every_steps=0: validation never runs, so "
                         "neither do they (set eval.every_steps and data.val)")
    dl = LossConfig()
    off = {"learned_logvar": ["logvar_init"],  # a switch that is off, and the keys only it reads
           "disc_weight": [k for k in LossConfig.__dataclass_fields__ if k.startswith(("disc_", "lecam_"))
                           and k != "disc_weight"],
           "perceptual_weight": ["perceptual_net", "lpips_vgg", "lpips_lin"]}
    for switch, keys in off.items():
        if not getattr(cfg.loss, switch):
            named = [f"loss.{k}" for k in keys if getattr(cfg.loss, k) != getattr(dl, k)]
            if switch == "perceptual_weight" and cfg.eval.lpips:  # validation's LPIPS reads lpips_vgg/lpips_lin
                named = [k for k in named if k == "loss.perceptual_net"]
            if named:
                notes.append(f"{', '.join(named)} set, but loss.{switch} is off: nothing reads "
                             f"{'it' if len(named) == 1 else 'them'}")
    if cfg.model.kind in ("classifier", "rotnet", "prior"):  # their task has its own loss: cross-entropy
        named = [f"loss.{k}" for k in LossConfig.__dataclass_fields__ if getattr(cfg.loss, k) != getattr(dl, k)]
        if named:
            notes.append(f"{', '.join(named)} set, but a model.kind={cfg.model.kind} run trains with cross-entropy "
                         f"alone: nothing reads {'it' if len(named) == 1 else 'them'}")
    notes += _unread_model_keys(cfg)
    return notes


_LDM_ONLY = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")
_VQ_ONLY = ("vq_codebook_size", "vq_beta", "vq_decay", "vq_eps", "vq_cosine", "vq_init", "vq_restart_after")
_KL_LOSS = ("kl_weight", "kl_anneal_steps", "kl_anneal_cycle", "kl_free_bits")


def model_keys_not_read(m: ModelConfig) -> set[str]:
    """The `model.*` keys the autoencoder kind / arch of `m` does not read (none for other kinds)."""
    if m.kind not in ("kl", "vq", "fsq"):
        return set()
    by_kind = {"kl": (*_VQ_ONLY, "fsq_levels"), "vq": ("fsq_levels", "double_z"),
               "fsq": (*_VQ_ONLY, "embed_dim", "double_z")}[m.kind]
    if m.kind == "kl" and m.arch == "spec":  # the spec encoder's output decides the latent's width
        by_kind += ("embed_dim",)
    return {*(_LDM_ONLY if m.arch == "spec" else ("encoder", "decoder")), *by_kind}


def _unread_model_keys(cfg: Config) -> list[str]:
    """Keys set away from their defaults that the chosen autoencoder kind / arch does not read (left from a
    base config of another kind, or typed for another one), in one note."""
    m, loss = cfg.model, cfg.loss
    if m.kind not in ("kl", "vq", "fsq"):
        return []
    dm, dl = ModelConfig(), LossConfig()
    keys = [f"model.{k}" for k in ModelConfig.__dataclass_fields__
            if k in model_keys_not_read(m) and getattr(m, k) != getattr(dm, k)]
    keys += [f"loss.{k}" for k in {"kl": ("vq_weight",), "vq": _KL_LOSS, "fsq": (*_KL_LOSS, "vq_weight")}[m.kind]
             if getattr(loss, k) != getattr(dl, k)]
    if not keys:
        return []
    return [f"{', '.join(keys)} set, but a model.kind={m.kind} model.arch={m.arch} model does not read "
            f"{'it' if len(keys) == 1 else 'them'}"]
