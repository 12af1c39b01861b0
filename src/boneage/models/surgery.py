"""Operations on trained weights: freezing all but the last layers, weight averaging ("model soups") and
re-estimating BatchNorm statistics after averaging."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from boneage.errors import BoneAgeInputError


def mixing_shares(n: int, weights: list[float] | None = None) -> list[float]:
    """Each of ``n`` models' share of an average, summing to 1 (equal without ``weights``): checked here
    once, so a caller can refuse bad weights before loading any model and record the shares it used."""
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise BoneAgeInputError(f"{len(w)} weights for {n} models")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise BoneAgeInputError(f"weights must be non-negative with a positive sum, got {w}")
    return [x / sum(w) for x in w]


def average_state_dicts(
    states: list[dict[str, torch.Tensor]], weights: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """The weighted mean of models that share one architecture (a "model soup", Wortsman et al. 2022):
    fine-tuned from one start, their average often scores like their ensemble at one model's cost.
    Floating tensors (BatchNorm running statistics included) are averaged in float32; integer ones (step
    counters) are taken from the first model, so an fp16 bundle and an fp32 checkpoint mix. Keys and shapes
    must match, or it fails naming one."""
    if not states:
        raise BoneAgeInputError("nothing to average: no models given")
    w = mixing_shares(len(states), weights)
    first = states[0]
    for i, other in enumerate(states[1:], start=2):
        if set(other) != set(first):
            diff = sorted(set(other) ^ set(first))
            raise BoneAgeInputError(f"model {i} has other tensors than model 1 (e.g. {diff[0]})")
        for k, v in first.items():
            if other[k].shape != v.shape:
                raise BoneAgeInputError(f"model {i}: {k} is {tuple(other[k].shape)}, not {tuple(v.shape)}")
    out: dict[str, torch.Tensor] = {}
    for k, v in first.items():
        if v.is_floating_point():
            out[k] = sum(wi * s[k].float() for wi, s in zip(w, states, strict=True))  # type: ignore[assignment]
        else:
            out[k] = v.clone()
    return out


def reestimate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Replace every BatchNorm layer's running statistics by the plain average over ``batches`` of (image,
    male) inputs, weights untouched: a weight average's statistics are not the average of its ingredients'
    (SWA's ``update_bn``, for a network with two inputs). Dropout stays off. Returns the images seen."""
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    stats = ("running_mean", "running_var", "num_batches_tracked")
    before = [{k: v.clone() for k, v in m.state_dict().items() if k in stats} for m in norms]
    was_training = model.training
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch, not an exponential one
        m.train()
    seen = 0
    try:
        with torch.no_grad():
            for image, male in batches:
                model(image, male)
                seen += len(image)
        if not seen:
            raise BoneAgeInputError("no images to re-estimate the BatchNorm statistics on")
    except BaseException:
        for m, old in zip(norms, before, strict=True):  # a failure leaves the statistics it found
            m.load_state_dict(old, strict=False)
        raise
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return seen


def parameterised_layers(model: nn.Module) -> list[nn.Module]:
    """Layers as Keras counted them: modules that own parameters, in order from input to output."""
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


def freeze_all_but(model: nn.Module, n: int | str) -> int:
    """Freeze everything except the last ``n`` parameterised layers (``"all"`` trains all); returns the count
    of trainable parameters. BatchNorm layers inside the frozen part keep their running statistics."""
    layers = parameterised_layers(model)
    keep = len(layers) if str(n).lower() == "all" else int(n)
    for i, layer in enumerate(layers):
        trainable = i >= len(layers) - keep
        for p in layer.parameters(recurse=False):
            p.requires_grad_(trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
