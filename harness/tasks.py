"""What the Trainer trains a model *for*: the loss of one micro-batch, what the data must carry,
what is drawn and what is written at the end. The Trainer holds one task and never asks which.

- `AutoencoderTask` (every autoencoder kind): the weighted loss of harness/losses.py; image grids.
- `ClassifierTask` (`model.kind: classifier`): cross-entropy on the shards' `cls` labels; at the
  end it measures accuracy and writes `perception.safetensors` + `perception.json`, the frozen
  network the perceptual loss reads (`loss.perceptual_net`).
- The same task without labels (`model.kind: rotnet`): every image is shown in its four rotations
  and the net predicts which (Gidaris et al. 2018, "Unsupervised representation learning by
  predicting image rotations"), so any shards train it: img2dataset/LAION shards have no `cls`.
- `PriorTask` (`model.kind: prior`): next-code cross-entropy of a transformer over the codes a
  frozen VQ/FSQ model (`model.prior_vq`) gives each batch; grids of decoded prior samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from harness import grids, scale
from harness.config import Config, ConfigError
from harness.data import condition_field, condition_problem, fixed_batch, to_model_input
from harness.losses import AutoencoderLoss, LossTerms
from models.prior import VQWithPrior
from models.registry import model_class


def refuse_reconstruction_options(cfg: Config, instead: str) -> None:
    """What only makes sense for a model that reconstructs images, refused in one line for one that does not."""
    kind = cfg.model.kind
    if cfg.loss.disc_weight > 0:
        raise ConfigError(f"loss.disc_weight: a discriminator judges reconstructions, and model.kind={kind} makes "
                          "none; set loss.disc_weight=0")
    if cfg.eval.every_steps:
        raise ConfigError(f"eval.every_steps: validation measures reconstructions, and model.kind={kind} makes none "
                          f"({instead}); set eval.every_steps=0")


class AutoencoderTask:
    draws_images = True
    needs_cls = None  # the loader's default: `cls` is required when the model is class-conditional

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        # Files the loss reads (a perception net) are checked first: a bad path stops the run
        # before anything is written. The loss module is never prepared: nothing in it trains.
        self.loss_fn = AutoencoderLoss(cfg.loss).to(device)
        self.cond_key = condition_field(cfg.model.condition)
        p = self.loss_fn.perception
        if p is not None and p.in_channels != cfg.model.out_ch:
            raise ConfigError(f"loss.perceptual_net: the network reads {p.in_channels}-channel images but the model "
                              f"makes {cfg.model.out_ch} (model.out_ch)")

    def check_data(self, info) -> None:
        if (problem := condition_problem(self.cfg.model, info.classes, info.label_names)) is not None:
            raise ConfigError(problem)

    def forward(self, model, x: torch.Tensor, batch: dict, cond, dtype: torch.dtype = torch.float32):
        """`x` in fp32 is the target; the model gets it in `dtype` (DeepSpeed bf16/fp16 casts the module)."""
        out = model(x.to(dtype), cond=cond)
        return out, self.loss_fn(x, out)

    def fingerprint(self) -> dict[str, str]:
        return self.loss_fn.fingerprint()

    def describe(self) -> str | None:
        if self.loss_fn.perception is None:
            return None
        info = self.loss_fn.perception.info
        acc = info.get("accuracy")
        acc = f"{acc:.3f}" if isinstance(acc, (int, float)) else "?"
        return (f"perceptual loss: frozen net {self.cfg.loss.perceptual_net} ({len(info.get('classes', []))} "
                f"classes, accuracy {acc} on {info.get('accuracy_on', '?')} at {info.get('image_size', '?')} px)")

    def finish(self, trainer) -> None:
        pass


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


ROTATIONS = ["0", "90", "180", "270"]  # degrees counter-clockwise: torch.rot90's k = 0..3


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`b c h w` square images -> their four rotations `(4 b) c h w` and the label of each."""
    views = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(len(x))
    return views, labels


class ClassifierTask:
    draws_images = False

    def __init__(self, cfg: Config, device: torch.device, labels: str = "cls"):
        self.cfg = cfg
        self.cond_key = None
        self.labels = labels  # "cls": the shards' class labels; "rotation": made from the images themselves
        self.needs_cls = labels == "cls"  # a sample without one (or outside the classes) is a bad sample
        self.classes: list[str] = list(ROTATIONS) if labels == "rotation" else []
        refuse_reconstruction_options(cfg, "a classifier reports its accuracy at the end (perception.json)")

    def check_data(self, info) -> None:
        if self.labels == "rotation":
            return
        if len(info.classes) < 2:
            raise ConfigError(f"data.train: the shards name {len(info.classes)} class(es) in index.json; a classifier "
                              "needs `cls` labels of at least 2 classes")
        num = self.cfg.model.num_classes
        if num and num != len(info.classes):
            raise ConfigError(f"model.num_classes: the shards have {len(info.classes)} classes; set "
                              f"model.num_classes={len(info.classes)} (or 0: from the shards)")
        self.classes = list(info.classes)
        self.cfg.model.num_classes = len(info.classes)  # before the model is built and its config hashed

    def inputs(self, x: torch.Tensor, cls: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the net sees and what it must answer."""
        if self.labels == "rotation":
            return rotations(x)
        return x, cls.to(x.device, non_blocking=True)

    def forward(self, model, x: torch.Tensor, batch: dict, cond, dtype: torch.dtype = torch.float32):
        x, y = self.inputs(x, batch.get("cls"))
        x = x.to(dtype)
        if (y < 0).any() or (y >= len(self.classes)).any():
            raise ConfigError(f"data.train: a sample has no `cls` label or one outside the {len(self.classes)} "
                              f"classes of index.json (keys {batch['key'][:2]})")
        logits = model(x).float()
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(1) == y).float().mean()
        return ClassifierOutput(logits, {"accuracy": accuracy}), LossTerms(loss, {"ce": loss})

    def fingerprint(self) -> dict[str, str]:
        return {}

    def describe(self) -> str | None:
        what = "rotation (no labels needed)" if self.labels == "rotation" else "class"
        return f"{what} classifier over {len(self.classes)} classes: {', '.join(self.classes[:5])}"

    @torch.no_grad()
    def finish(self, trainer) -> None:
        """Measure accuracy on held-out shards (data.val) or the training shards, and write the
        perception network file the perceptual loss reads, atomically, into the run folder."""
        from harness.perception_file import FORMAT, save_perception
        from shards.atomic import write_atomic

        if not trainer.world.is_main:
            return
        cfg = self.cfg
        net = trainer.engine.unwrapped()
        was_training = net.training
        net.eval()
        eval_on = cfg.data.val or cfg.data.train
        ref = fixed_batch(eval_on, cfg.log.eval_samples, cfg.data.image_size, names=self.needs_cls)
        if ref is None:
            raise ConfigError(f"{eval_on}: no readable samples to measure the accuracy on")
        correct = n = 0
        chunks = cfg.train.batch_size
        for images, cls in zip(ref["image"].split(chunks), ref["cls"].split(chunks), strict=True):
            x, labels = self.inputs(to_model_input(images, trainer.device), cls)
            correct += int((net(x).float().argmax(1) == labels).sum())
            n += len(labels)
        net.train(was_training)
        info = {
            "labels": self.labels,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "accuracy": correct / n,
            "accuracy_on": "val" if cfg.data.val else "train",
            "eval_samples": n,
            "chance": 1 / len(self.classes),
            "final_train_loss": trainer.last_loss,
            "image_size": cfg.data.image_size,
            "steps": trainer.step,
            "batch_size": cfg.train.batch_size,
            "world_size": trainer.world.world_size,
            "data": cfg.data.train,
            "val": cfg.data.val,
        }
        net = net.float() if next(net.parameters()).dtype != torch.float32 else net
        path = save_perception(net, trainer.run_dir / "perception.safetensors", info)
        write_atomic(trainer.run_dir / "perception.json",
                     json.dumps({"format": FORMAT, "arch": asdict(net.arch), **info}, indent=1))
        trainer.log.info(f"accuracy {info['accuracy']:.3f} on {n} {info['accuracy_on']} samples "
                         f"(chance {info['chance']:.3f}); wrote {path} and {trainer.run_dir / 'perception.json'}")
        trainer.log.info("use it: python launch/train.py --config launch/configs/perceptual_demo.yaml "
                         f"loss.perceptual_net={path}")


# ---------------------------------------------------------------------------------------------
# A prior over a frozen VQ model's codes (model.kind: prior)
# ---------------------------------------------------------------------------------------------


@dataclass
class PriorOutput:
    logits: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def frozen_vq(path: str, device) -> tuple[torch.nn.Module, Config, Path, bool]:
    """`_frozen_vq`, read once more after a failure when `path` is a run folder: a VQ run still training may
    prune the checkpoint it resolved to while it is read (the other tools that read a run retry likewise)."""
    from harness.inference import LoadError, is_run_folder

    try:
        return _frozen_vq(path, device)
    except (LoadError, ConfigError, OSError):
        if not is_run_folder(Path(path)):
            raise
        return _frozen_vq(path, device)


def _frozen_vq(path: str, device) -> tuple[torch.nn.Module, Config, Path, bool]:
    """The VQ/FSQ model at `path` (run, checkpoint or export folder), frozen in eval mode, its config,
    the folder its weights came from, and whether they are its EMA weights: those when its run kept an
    EMA (what evaluation judges it by), else the trained ones. The same choice at every start, resume
    and in launch/sample.py, so the prior always sees the codes it was trained on."""
    from harness.inference import LoadError, find_weights_dir, load_config_of, load_model

    try:
        folder = find_weights_dir(path)
        vq_cfg = load_config_of(folder)
    except (LoadError, ConfigError) as e:
        raise ConfigError(f"model.prior_vq: {e}") from None
    if vq_cfg.model.kind not in ("vq", "fsq"):
        raise ConfigError(f"model.prior_vq: {path} holds a model.kind={vq_cfg.model.kind} model; a prior models the "
                          "codes of a vq or fsq run")
    ema = vq_cfg.train.ema_decay > 0
    try:
        vq, _, _ = load_model(folder, ema=ema, device=device)
    except LoadError:
        if not ema:  # an export folder holds one set of weights, EMA or not: take it
            raise
        vq, _, _, ema = *load_model(folder, device=device), False
    return vq.requires_grad_(False).eval(), vq_cfg, folder, ema


def vq_derived(vq, vq_cfg: Config, shape: tuple) -> dict:
    """What a prior takes from its VQ model (its `model.*` keys): codebook size, code grid, condition."""
    return {"prior_codebook_size": vq.quantizer.codebook_size, "prior_grid": list(shape[1:]),
            "condition": vq_cfg.model.condition, "num_classes": vq_cfg.model.num_classes}


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class PriorTask:
    """Next-code cross-entropy of `model.kind: prior` over the codes the frozen VQ model
    (`model.prior_vq`) gives each batch. The VQ model is no part of the trained model: not in the
    optimizer, not in checkpoints; it is read from `prior_vq` again at resume (a changed file is
    noted). Grids: prior samples (and one row per class), decoded by the VQ model."""

    draws_images = False  # no fixed batch of inputs: `images` draws samples only
    needs_cls = None

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, m = cfg, cfg.model
        refuse_reconstruction_options(cfg, "loss/ce and model/bits_per_code are logged")
        self.vq, self.vq_cfg, self.vq_folder, self.vq_ema = frozen_vq(m.prior_vq, device)
        shape = tuple(self.vq.latent_shape(cfg.data.image_size))
        if len(shape) != 3:  # a spec encoder ending in Flat/Lin: one code for the whole image, no grid
            raise ConfigError(f"model.prior_vq: {self.vq_folder} has a latent of shape {shape} at data.image_size="
                              f"{cfg.data.image_size}; a prior needs a (c, h, w) code grid (a spec encoder that ends "
                              "in a feature map, not Flat/Lin)")
        derived = vq_derived(self.vq, self.vq_cfg, shape)
        unset = {"prior_codebook_size": 0, "prior_grid": [], "condition": "none", "num_classes": 0}
        for key, value in derived.items():  # before the model is built and its config hashed
            given = getattr(m, key)
            if given != unset[key] and given != value:
                raise ConfigError(f"model.{key}: {given} here, but the model in model.prior_vq gives {value} "
                                  f"({self.vq_folder}); leave it unset, it is derived")
            setattr(m, key, value)
        self.cond_key = condition_field(m.condition)
        self._digest = weights_digest(self.vq)

    def check_data(self, info) -> None:
        AutoencoderTask.check_data(self, info)  # the VQ model's condition needs the same labels

    def forward(self, model, x: torch.Tensor, batch: dict, cond, dtype: torch.dtype = torch.float32):
        with torch.no_grad():
            codes = self.vq.encode_indices(x.float(), cond)
        logits = model(codes, cond=cond).float()
        ce = F.cross_entropy(rearrange(logits, "b l k -> b k l"), rearrange(codes, "b h w -> b (h w)"))
        return PriorOutput(logits, {"bits_per_code": ce.detach() / math.log(2)}), LossTerms(ce, {"ce": ce})

    def fingerprint(self) -> dict[str, str]:
        return {"prior_vq": self._digest}

    def describe(self) -> str | None:
        m, size, vq_size = self.cfg.model, self.cfg.data.image_size, self.vq_cfg.data.image_size
        note = f"; note: data.image_size={size} but the VQ model trained at {vq_size} px" if size != vq_size else ""
        cond = {"class": f"class-conditional ({m.num_classes} classes)",
                "multilabel": f"label-conditional ({m.num_classes} labels)"}.get(m.condition, "unconditional")
        return (f"{cond} prior over {m.prior_codebook_size} codes on a {m.prior_grid[0]}x{m.prior_grid[1]} grid of "
                f"the frozen model.kind={self.vq_cfg.model.kind} model {self.vq_folder} "
                f"({'EMA' if self.vq_ema else 'trained'} weights); uniform = "
                f"{math.log2(m.prior_codebook_size):.2f} bits per code{note}")

    def sampler(self, prior: torch.nn.Module) -> VQWithPrior:
        return VQWithPrior(self.vq, prior)

    @torch.no_grad()
    def images(self, trainer, tracker) -> None:
        """Prior samples and one row per class, decoded. Every rank samples (under ZeRO-3 the
        parameters are gathered collectively); only the main process writes."""
        c = self.cfg
        prior = trainer.engine.unwrapped()
        was_training = prior.training
        prior.eval()
        n, size, seed, step = c.log.num_images, c.data.image_size, c.train.seed, trainer.step
        with scale.full_parameters(trainer.engine.model):
            model = self.sampler(prior)
            tracker.grid("prior_samples", [model.sample(n, size, generator=grids.generator(trainer.device, seed))],
                         step)
            conds = grids.class_conditions(model.condition, c.model.num_classes, c.log.class_rows, n, trainer.device)
            if conds is not None:
                tracker.grid("class_samples", grids.class_rows(model, size, conds, n, seed), step)
        tracker.flush()
        prior.train(was_training)

    def finish(self, trainer) -> None:
        pass


PRIOR_VQ_DIGEST = "prior_vq_digest"  # in an exported prior's model.safetensors metadata (launch/export.py)


def trained_vq_digest(folder: Path) -> str | None:
    """The digest of the VQ weights the prior in `folder` was trained on: a checkpoint's trainer state
    records it, an export its safetensors metadata; None when neither does (an older export)."""
    try:
        then = json.loads((folder / "trainer_state.json").read_text()).get("loss_files", {}).get("prior_vq")
    except (OSError, ValueError, AttributeError):
        then = None
    if then is None and (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        try:
            with safe_open(folder / "model.safetensors", "pt") as f:
                then = (f.metadata() or {}).get(PRIOR_VQ_DIGEST)
        except Exception:  # noqa: BLE001 -- unreadable metadata: nothing to compare with (the weights loaded)
            then = None
    return then if isinstance(then, str) else None


def prior_sampler(prior_path: str | Path, *, ema: bool = False, device="cpu", temperature: float = 1.0,
                  top_k: int = 0, prior_vq: str | None = None) -> tuple[VQWithPrior, Config, Path]:
    """A prior run (or checkpoint, or export) and its VQ model as one model that samples images: the one
    its `model.prior_vq` names, or `prior_vq` (sample.py --prior-vq) when that is given."""
    from harness.inference import load_model

    prior, cfg, folder = load_model(prior_path, ema=ema, device=device, prior_vq=prior_vq)
    if cfg.model.kind != "prior":
        raise ConfigError(f"{prior_path}: a model.kind={cfg.model.kind} model, not a prior")
    vq, vq_cfg, vq_folder = prior_vq_of(cfg, folder, device, prior_vq, "--prior-vq")
    return VQWithPrior(vq, prior, temperature=temperature, top_k=top_k), cfg, folder


def prior_vq_of(cfg: Config, folder: Path, device, override: str | None, flag: str, note: bool = True):
    """The frozen VQ model of the prior in `folder` (config `cfg`): from `override` when given (a tool's
    `flag`; cfg.model.prior_vq is then set to it), else from its model.prior_vq. It must be the kind of VQ
    model the prior was trained on (codebook size, code grid, condition, classes: else one line naming what
    differs); other weights than the ones it learned are a note (unless `note` is false)."""
    where = flag if override else "model.prior_vq"
    if override:
        cfg.model.prior_vq = str(override)
    try:
        vq, vq_cfg, vq_folder, _ = frozen_vq(cfg.model.prior_vq, device)
    except ConfigError as e:
        msg = str(e).removeprefix("model.prior_vq: ")
        hint = "" if override else (f"; if the VQ model is elsewhere now (its step_N pruned: an export of it), "
                                    f"name it with {flag} PATH")
        raise ConfigError(f"{where}: {msg}{hint}") from None
    shape = tuple(vq.latent_shape(cfg.data.image_size))
    derived = vq_derived(vq, vq_cfg, shape) if len(shape) == 3 else {"prior_grid": list(shape)}
    differ = [f"{k} {v} (the prior's: {getattr(cfg.model, k)})" for k, v in derived.items()
              if v != getattr(cfg.model, k)]
    if differ:  # codes the prior never saw: an index error, an empty grid, or images of the wrong classes
        raise ConfigError(f"{where}: {vq_folder} is not the kind of VQ model this prior was trained on: it gives "
                          f"{', '.join(differ)}; name the VQ model it was trained with"
                          + ("" if override else f" ({flag} PATH)"))
    then = trained_vq_digest(folder)
    if note and then is not None and then != weights_digest(vq):
        print(f"note: {where} {'gives' if override else 'now gives'} other weights ({vq_folder}) than this prior was "
              "trained on (the VQ run went on, or the path names another checkpoint): its codes may not be the ones "
              f"the prior learned; name the step_N it was trained with ({flag} PATH)", file=sys.stderr)
    return vq, vq_cfg, vq_folder


def make_task(cfg: Config, device: torch.device):
    """The task the model kind's class asks for (`task` attribute; autoencoders have none)."""
    task = getattr(model_class(cfg.model.kind), "task", "autoencoder")
    if task == "autoencoder":
        return AutoencoderTask(cfg, device)
    if task == "prior":
        return PriorTask(cfg, device)
    return ClassifierTask(cfg, device, labels={"classifier": "cls", "rotation": "rotation"}[task])
