"""`model.kind: classifier`: the perception network (models/perception.py) as a trainable kind,
so it trains through the same Trainer as every autoencoder (checkpoints, resume, TensorBoard,
DDP, SLURM); harness/tasks.py's ClassifierTask gives it its loss and writes its file at the end.

Its keys are the autoencoders' where they mean the same: stage s has `ch * ch_mult[s]` channels
(the first at full resolution, each later one halving it), `norm_groups` GroupNorm groups,
`in_channels` image channels, `num_classes` classes (0 = as many as the shards name).

`model.kind: rotnet` is the same network trained without labels: it predicts which of four
rotations it was shown (harness/tasks.py), so `num_classes` is 4 whatever the config says.
"""

from __future__ import annotations

from models.base import ModelConfigError
from models.perception import PerceptionNet


class Classifier(PerceptionNet):
    task = "classifier"  # harness/tasks.py: cross-entropy on the shards' `cls` labels
    config_keys = ("ch", "ch_mult", "norm_groups", "num_classes", "in_channels")

    @classmethod
    def from_config(cls, m) -> Classifier:
        return cls(in_channels=m.in_channels, channels=[m.ch * k for k in m.ch_mult], num_classes=m.num_classes,
                   norm_groups=m.norm_groups)

    @classmethod
    def check_config(cls, m, image_size: int) -> None:
        if not m.ch_mult or any(k < 1 for k in m.ch_mult):
            raise ModelConfigError(f"model.ch_mult: need a non-empty list of positive integers; got {m.ch_mult}")
        for i, k in enumerate(m.ch_mult):
            if (m.ch * k) % m.norm_groups:
                raise ModelConfigError(f"model.norm_groups: {m.ch * k} channels (model.ch * ch_mult[{i}]) are not "
                                       f"divisible into {m.norm_groups} groups")
        if m.condition != "none":
            raise ModelConfigError("model.condition: a classifier reads no condition; set model.condition=none")

    @classmethod
    def deepspeed_unsupported(cls, m) -> str | None:
        return ("model.kind=classifier/rotnet: the perception net is small and measures its accuracy on one "
                "process at the end; train it with DDP (launch/accelerate/multi_gpu.yaml or cpu2.yaml)")


class RotationClassifier(Classifier):
    task = "rotation"
    config_keys = ("ch", "ch_mult", "norm_groups", "in_channels")

    @classmethod
    def from_config(cls, m) -> RotationClassifier:
        return cls(in_channels=m.in_channels, channels=[m.ch * k for k in m.ch_mult], num_classes=4,
                   norm_groups=m.norm_groups)

    @classmethod
    def check_config(cls, m, image_size: int) -> None:
        super().check_config(m, image_size)
        if m.num_classes not in (0, 4):
            raise ModelConfigError(f"model.num_classes: a rotation classifier has 4 classes (0, 90, 180, 270 "
                                   f"degrees); got {m.num_classes} (set 0 or 4)")
        m.num_classes = 4
