"""A timm backbone plus 16BitNet's dense sex branch and a dense head that outputs bone age in months.

Targets are normalised inside the model (a learned head predicts z-scores of the training ages, and the
model's buffers turn them back into months), so nothing outside this module ever sees normalised ages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import timm
import torch
from torch import nn

from boneage.errors import BoneAgeInputError
from boneage.modelfile import ModelFile
from boneage.ood import TEXTURE_STAGE
from boneage.spec import GREY_MEAN, GREY_STD, ModelSpec


class Head(nn.Module):
    """Dense layers → one output (the age's z-score) or ``outputs`` age-bin logits. Layer names do not depend
    on dropout (a checkpoint trained with another dropout initialises the whole head): ``hidden.<i>`` and
    ``out``."""

    def __init__(self, width: int, units: list[int], dropout: float = 0.0, outputs: int = 1) -> None:
        super().__init__()
        self.hidden = nn.ModuleList()
        for u in units:
            self.hidden.append(nn.Linear(width, u))
            width = u
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self.drop(torch.relu(layer(x)))
        if self.out.out_features > 1:  # age-bin logits reach the hundreds: bf16 would blur neighbouring bins
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.out(x.float())
        return self.out(x)


def stage_statistics(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) activations → (B, 2C): per-channel spatial mean, then standard deviation."""
    x = x.float()
    mean = x.mean((2, 3))
    std = (x - mean[:, :, None, None]).pow(2).mean((2, 3)).clamp_min(0).sqrt()
    return torch.cat([mean, std], 1)


class BoneAgeNet(nn.Module):
    """Image features ⊕ dense(sex) → dense head → bone age in months."""

    def __init__(
        self,
        backbone: str,
        head: list[int],
        sex_units: int = 32,
        dropout: float = 0.0,
        in_chans: int = 1,
        age_mean: float = 127.0,
        age_std: float = 41.0,
        age_bins: int = 0,
        age_range: tuple[float, float] = (0.0, 240.0),
    ) -> None:
        super().__init__()
        try:
            self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, in_chans=in_chans)
        except RuntimeError as exc:  # timm's "Unknown model"
            raise BoneAgeInputError(f"unknown timm backbone {backbone!r} ({exc})") from None
        self.backbone_name = backbone
        self.in_chans = in_chans
        self.sex = nn.Sequential(nn.Linear(1, sex_units), nn.ReLU(inplace=True))
        self.age_bins = int(age_bins)
        self.head = Head(self.backbone.num_features + sex_units, list(head), dropout, max(1, self.age_bins))
        if self.age_bins:  # the ages the label-distribution head's logits stand for (months)
            self.register_buffer("age_centres", torch.linspace(*map(float, age_range), self.age_bins))
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))
        self.register_buffer("pixel_mean", torch.tensor(GREY_MEAN))
        self.register_buffer("pixel_std", torch.tensor(GREY_STD))
        # the stage the OOD texture statistics are tapped from: the one a model file's texture density was
        # fitted on (``network_from_file``), else the current choice for new fits
        self.texture_stage = TEXTURE_STAGE
        # how build_model initialised the weights: source, tensors loaded, model tensors left as initialised
        self.init_report: dict[str, Any] = {"source": "none", "loaded": 0, "skipped": []}

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> BoneAgeNet:
        """The network a spec describes, with its target statistics and pixel normalisation."""
        net = cls(
            spec.backbone,
            spec.head,
            spec.sex_units,
            spec.dropout,
            spec.in_chans,
            age_bins=spec.age_bins,
            age_range=spec.age_range,
        )
        net.set_target_stats(spec.target_mean, spec.target_std)
        net.pixel_mean.fill_(spec.pixel_mean)
        net.pixel_std.fill_(spec.pixel_std)
        return net

    def set_target_stats(self, mean: float, std: float) -> None:
        """Centre the output on the training ages so the head starts near the right answer."""
        self.age_mean.fill_(float(mean))
        self.age_std.fill_(max(float(std), 1e-3))

    def backbone_input(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] → what the backbone's stem expects; shared by every path into it."""
        x = (image - self.pixel_mean) / self.pixel_std
        if self.in_chans > 1:  # a 3-channel backbone sees the grey image in every channel
            x = x.expand(-1, self.in_chans, -1, -1)
        return x

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.backbone_input(image))

    def supports_texture(self, stage: int) -> bool:
        """Whether ``texture_statistics`` and ``features_with_texture`` can tap ``stage``: an EfficientNet
        layout timm backbone (stem, ``bn1``, ``blocks``, ``conv_head``, ``bn2``) with more than ``stage``
        blocks."""
        b = self.backbone
        layout = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
        return all(hasattr(b, n) for n in layout) and len(b.blocks) > stage

    def block_outputs(
        self, image: torch.Tensor, last: int | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, output) of each block of an EfficientNet-layout backbone, after the stem, up to block
        ``last``: the one walk shared by the texture tap, the one-pass OOD features and the ONNX graph."""
        b = self.backbone
        x = b.bn1(b.conv_stem(self.backbone_input(image)))
        for i, block in enumerate(b.blocks):
            if last is not None and i > last:
                return
            x = block(x)
            yield i, x

    def texture_statistics(self, image: torch.Tensor, stage: int) -> torch.Tensor:
        """Per-channel mean and standard deviation of the backbone's ``blocks[stage]`` output (B, 2C): the
        early-layer texture the OOD check's second density models (``boneage.ood``). Runs only the stem
        and the first ``stage + 1`` blocks."""
        for i, x in self.block_outputs(image, last=stage):
            if i == stage:
                return stage_statistics(x)
        raise ValueError(f"backbone has no block {stage} to tap")

    def features_with_texture(self, image: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and ``texture_statistics`` from one pass: what the OOD check scores."""
        b = self.backbone
        x, texture = image, None
        for i, x in self.block_outputs(image):
            if i == stage:
                texture = stage_statistics(x)
        if texture is None:
            raise ValueError(f"backbone has no block {stage} to tap")
        return b.forward_head(b.bn2(b.conv_head(x))), texture  # timm EfficientNet's forward_features tail

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> torch.Tensor:
        """``image``: (B, 1, H, W) in [0, 1]; ``male``: (B,) 0/1 → (B,) bone age in months."""
        return self.forward_with_features(image, male)[0]

    def forward_with_features(
        self, image: torch.Tensor, male: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bone age in months and the pooled image features it came from (what ``boneage.ood`` models)."""
        out, feats = self.head_output(image, male)
        return self.to_months(out), feats

    def head_output(self, image: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's raw output (B, 1 z-score or ``age_bins`` logits) and the pooled features: what the
        label-distribution loss needs besides the months."""
        feats = self.features(image)
        sex = self.sex(male.reshape(-1, 1).to(feats.dtype))
        return self.head(torch.cat([feats, sex], dim=1)), feats

    def to_months(self, out: torch.Tensor) -> torch.Tensor:
        """Head output → (B,) months: the z-score de-normalised, or the logits' expected age."""
        if self.age_bins:
            # a product and a sum, not a matmul: autocast rounds a matmul to bf16 (1-month steps at 128+)
            return (torch.softmax(out.float(), dim=1) * self.age_centres).sum(1)
        return out.squeeze(1).float() * self.age_std + self.age_mean


def network_from_file(model_file: ModelFile) -> BoneAgeNet:
    """The network a model file holds, its weights loaded (all of them: a missing tensor is an error)."""
    net = BoneAgeNet.from_spec(model_file.spec)
    missing, _unexpected = net.load_state_dict(model_file.network_state(), strict=False)
    if missing:
        raise BoneAgeInputError(
            f"the model file lacks {len(missing)} network tensors (e.g. {missing[0]})", model_file.path
        )
    ood = model_file.facts.ood
    if ood is not None and ood.texture_stage is not None:  # its texture density's statistics, not today's
        net.texture_stage = int(ood.texture_stage)
    return net.eval()
