"""The talk's training augmentations on batched tensors, with per-sample random parameters (kornia).

One implementation serves both devices: it runs after the batch reaches the accelerator (GPU) or on the
CPU batch when there is none, so the parameter set in the config means the same thing everywhere.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from boneage.config import AugmentConfig


class Augment(nn.Module):
    """Horizontal flip, shift, rotation, zoom, gamma, brightness and contrast for (B, 1, H, W) in [0, 1]."""

    def __init__(self, cfg: AugmentConfig | None = None, **overrides: float) -> None:
        super().__init__()
        cfg = cfg or AugmentConfig()
        values = {**cfg.__dict__, **overrides}
        self.enabled = bool(values["enabled"])
        ops: list[nn.Module] = []
        if values["flip"] > 0:
            ops.append(K.RandomHorizontalFlip(p=values["flip"]))
        if values["rotate"] > 0 or values["shift"] > 0 or values["zoom"] > 0:
            shift, zoom = values["shift"], values["zoom"]
            ops.append(
                K.RandomAffine(
                    degrees=values["rotate"],
                    translate=(shift, shift) if shift > 0 else None,
                    scale=(1 - zoom, 1 + zoom) if zoom > 0 else None,
                    padding_mode="zeros",
                    p=1.0,
                )
            )
        if values["gamma"] > 0:
            ops.append(K.RandomGamma(gamma=(1 - values["gamma"], 1 + values["gamma"]), p=1.0))
        if values["brightness"] > 0:
            b = values["brightness"]
            ops.append(K.RandomBrightness(brightness=(1 - b, 1 + b), p=1.0))
        if values["contrast"] > 0:
            c = values["contrast"]
            ops.append(K.RandomContrast(contrast=(1 - c, 1 + c), p=1.0))
        self.ops = nn.Sequential(*ops)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.enabled or len(self.ops) == 0:
            return images
        out = self.ops(images.float())
        return out.clamp_(0, 1).to(images.dtype)
