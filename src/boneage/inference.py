"""``Predictor``: load a checkpoint or the bundled model once, then predict bone age with TTA.

A checkpoint or bundle carries its ``ModelSpec`` (preprocessing, backbone, target statistics) and nothing
about how it was trained, so the predictor rebuilds the exact training-time input from a raw file with nothing
else to go on. The bundled model is fp16 safetensors with the spec and model-card facts in the file's
metadata (written by ``boneage.bundle``). Files of the v0.1 layout, which carried the whole training config,
are converted on load.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from boneage.errors import BoneAgeInputError
from boneage.labels import parse_sex as normalize_sex
from boneage.models import BoneAgeNet, checkpoint_state, read_state_dict, stage_statistics
from boneage.ood import PREFIX as OOD_PREFIX
from boneage.ood import TEXTURE_STAGE, FeatureDensity
from boneage.runtime import (
    BUNDLED_NAME,
    ONNX_EXPORT_VERSION,
    ONNX_META_DIGEST,
    ONNX_META_VERSION,
    TTA_VIEWS,
    BasePredictor,
    Prediction,
    bundled_model_path,
    file_digest,
    onnx_path_for,
    plain_run,
)
from boneage.spec import ModelSpec, PreprocessSpec, spec_from_record

__all__ = [
    "AVERAGE_RECORDS",
    "BUNDLED_NAME",
    "TTA_VIEWS",
    "Prediction",
    "Predictor",
    "bundled_model_path",
    "cached_onnx_export",
    "export_bundle_onnx",
    "export_onnx",
    "normalize_sex",
    "read_model_file",
    "tta_batch",
]


# what a weight average (boneage.bundle.average_checkpoints) records of itself: of which models, and how its
# BatchNorm statistics came about; read with the model and carried into a bundle's facts
AVERAGE_RECORDS = ("averaged_from", "batchnorm")


def tta_batch(images: torch.Tensor, views: list[tuple[bool, float, float]]) -> torch.Tensor:
    """(B, 1, S, S) → (V·B, 1, S, S), view-major, with kornia's deterministic flips, rotations and zooms."""
    import kornia.geometry.transform as KT

    out = []
    for flip, angle, zoom in views:
        x = images.flip(-1) if flip else images
        if angle:
            x = KT.rotate(x, torch.full((x.shape[0],), float(angle), device=x.device))
        if zoom != 1.0:
            x = KT.scale(x, torch.full((x.shape[0], 2), float(zoom), device=x.device))
        out.append(x)
    return torch.cat(out, 0)


def read_model_file(path: Path) -> tuple[dict[str, Any], ModelSpec, dict[str, torch.Tensor]]:
    """(facts, spec, float weights) of a bundle (.safetensors) or a training checkpoint (.ckpt), in the
    current layout or v0.1's (whole training config, head layers named by index), which is converted."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("boneage", "{}"))
        except Exception as exc:
            raise BoneAgeInputError(f"not a readable safetensors file ({type(exc).__name__})", path) from None
        if not isinstance(meta, dict) or not ({"spec", "config"} & set(meta)):
            raise BoneAgeInputError("safetensors file has no boneage metadata", path)
        state = read_state_dict(path)
        spec = spec_from_record(meta, state, path)
        facts = {k: v for k, v in meta.items() if k not in {"spec", "config"}}
        return facts, spec, state
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise BoneAgeInputError(f"not a readable checkpoint ({type(exc).__name__})", path) from None
    if not isinstance(blob, dict):
        raise BoneAgeInputError("not a boneage checkpoint", path)
    hp = blob.get("hyper_parameters") or {}
    state = checkpoint_state(blob)
    record = {"spec": blob["boneage_spec"]} if "boneage_spec" in blob else hp
    if not ({"spec", "config"} & set(record)):
        raise BoneAgeInputError("checkpoint has no boneage model spec (not from boneage train?)", path)
    spec = spec_from_record(record, state, path)
    if "spec" in record and "boneage_spec" not in blob:  # hyper-parameters hold the spec before fitting
        spec.target_mean, spec.target_std = float(state["age_mean"]), float(state["age_std"])
    return {"source": str(path), **{k: blob[k] for k in AVERAGE_RECORDS if k in blob}}, spec, state


class Predictor(BasePredictor):
    """The torch engine: model + preprocessing + kornia TTA + hook-based Grad-CAM, for research and for
    checking the ONNX engine; ``runtime='onnx'`` runs its network through onnxruntime on the CPU.

    Grad-CAM hooks the network's modules while it runs, so this predictor is not thread-safe (the web app
    serialises it); ``boneage.runtime.OnnxPredictor`` is.
    """

    def __init__(
        self,
        model: BoneAgeNet,
        spec: ModelSpec,
        meta: dict[str, Any] | None = None,
        *,
        device: str = "cpu",
        tta: bool = True,
    ) -> None:
        super().__init__(spec, meta, tta=tta)
        # float32 once here: a model handed over in bf16/fp16 (e.g. from a mixed-precision trainer) would
        # otherwise need casting in every method that runs it
        self.model = model.float().eval().to(device)
        self.device = torch.device(device)
        self.onnx_session: Any = None
        self.weights_path: Path | None = None  # set by load(); keys the cached ONNX export

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls, path: str | Path | None = None, *, device: str = "cpu", tta: bool = True, runtime: str = "torch"
    ) -> Predictor:
        """``path`` None → the bundled model; ``.ckpt`` from ``boneage train``; ``.safetensors`` bundle."""
        p = Path(path) if path is not None else bundled_model_path()
        if not p.is_file():
            if path is None:
                raise BoneAgeInputError("no bundled model in this installation; pass --checkpoint CKPT")
            raise BoneAgeInputError("checkpoint not found", p)
        meta, spec, state = read_model_file(p)
        ood = {k: v.numpy() for k, v in state.items() if k.startswith(OOD_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(OOD_PREFIX)}
        model = BoneAgeNet.from_spec(spec)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise BoneAgeInputError(f"checkpoint lacks {len(missing)} model tensors (e.g. {missing[0]})", p)
        predictor = cls(model, spec, meta, device=device, tta=tta)
        predictor.ood = FeatureDensity.from_tensors(ood)
        predictor.weights_path = p
        if runtime not in {"torch", "onnx", "auto"}:
            raise BoneAgeInputError(f"unknown runtime {runtime!r} (torch, onnx or auto)")
        if runtime == "onnx" or (runtime == "auto" and device == "cpu"):
            predictor.use_onnx(required=runtime == "onnx")
        return predictor

    def with_preprocess(self, **changes: Any) -> Predictor:
        """The same network behind another preprocessing, for measuring a model on an input it was not
        trained with (``benchmarks/fit_readout.py``, ``benchmarks/native_geometry.py``). ``changes`` are
        validated as a model file's spec is, so a misspelt field or an out-of-range size fails here rather
        than silently scoring the unchanged input. The network is shared, not copied. The copy runs on
        torch (call ``use_onnx`` for a graph of its input size; the original's cached export is keyed by the
        weights file alone and would have the wrong size) and has no OOD density, which was fitted on the
        original input."""
        try:
            pre = PreprocessSpec.model_validate({**self.spec.preprocess.model_dump(), **changes})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise BoneAgeInputError(f"preprocess.{where}: {first['msg']}") from None
        spec = self.spec.model_copy(update={"preprocess": pre})
        return Predictor(self.model, spec, self.meta, device=str(self.device), tta=len(self.views) > 1)

    def use_onnx(self, path: str | Path | None = None, *, required: bool = True) -> bool:
        """Switch the network to onnxruntime (exported on the fly unless ``path`` names an .onnx file)."""
        try:
            import onnxruntime as ort
        except ImportError:
            if required:
                raise BoneAgeInputError("onnxruntime is not installed (pip install onnxruntime)") from None
            return False
        if path is None:
            path = self._exported_onnx()
        opts = ort.SessionOptions()
        self.onnx_session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return True

    def _exported_onnx(self) -> Path:
        """The ONNX graph of these weights, exported once and kept in the user cache (keyed by the weights
        file's hash and the torch version), so a CLI call or server start pays ~0.1 s instead of ~1.5 s."""
        import tempfile

        source = self.weights_path
        if source is None or not Path(source).is_file():
            target = Path(tempfile.mkdtemp(prefix="boneage-onnx-")) / "model.onnx"
            return export_onnx(self, target)
        return cached_onnx_export(source, self)

    # ---- prediction ----------------------------------------------------------------------------------
    def _network(self, images: torch.Tensor, male: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(months (B,), pooled features (B, D)) from either runtime."""
        if self.onnx_session is not None:
            out = self.onnx_session.run(None, {"image": images.numpy(), "male": male.numpy()})
            feats = out[1] if len(out) > 1 else np.zeros((len(out[0]), 0), np.float32)
            return np.asarray(out[0], dtype=np.float32).reshape(-1), np.asarray(feats, dtype=np.float32)
        with torch.inference_mode():
            months, feats = self.model.forward_with_features(images.to(self.device), male.to(self.device))
            return months.float().cpu().numpy(), feats.float().cpu().numpy()

    def _forward_views(
        self, images: np.ndarray, male: np.ndarray, views: list[tuple[bool, float, float]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        s = torch.from_numpy(np.ascontiguousarray(male, dtype=np.float32))
        months, feats = self._network(tta_batch(x, views), s.repeat(len(views)))
        return months, feats, None

    def texture_statistics(self, images: np.ndarray) -> np.ndarray | None:
        """The OOD texture statistics of preprocessed uint8 images (N, S, S); None for a backbone without
        the EfficientNet layout. Always the torch network (a partial pass), also when ONNX runs predict."""
        if not self.model.supports_texture(TEXTURE_STAGE):
            return None
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), 32):
                x = torch.from_numpy(np.ascontiguousarray(images[start : start + 32], dtype=np.float32))
                out.append(self.model.texture_statistics(x[:, None].div(255).to(self.device), TEXTURE_STAGE))
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, 0), np.float32)

    def plain_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Pooled features and texture statistics of plain views from one pass (the ONNX engine's graph
        taps both the same way); the network's features alone for a backbone without the layout."""
        if self.onnx_session is not None:
            return self._onnx_plain_outputs(images)
        if not self.model.supports_texture(TEXTURE_STAGE):
            return super().plain_outputs(images)
        feats, texture = [], []
        with torch.inference_mode():
            for start in range(0, len(images), 32):
                x = torch.from_numpy(np.ascontiguousarray(images[start : start + 32], dtype=np.float32))
                f, t = self.model.features_with_texture(x[:, None].div(255).to(self.device), TEXTURE_STAGE)
                feats.append(f.float().cpu())
                texture.append(t.float().cpu())
        if not feats:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        return torch.cat(feats).numpy(), torch.cat(texture).numpy()

    def _onnx_plain_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One run of the exported graph gives both, when it taps the texture (a graph with the in-graph
        heatmap does); an older graph without that output gets the torch network's partial pass for it."""
        out = plain_run(self.onnx_session, images)
        feats = np.asarray(out.get("features", np.zeros((len(images), 0))), dtype=np.float32)
        if "texture" in out:
            return feats, np.asarray(out["texture"], dtype=np.float32)
        return feats, self.texture_statistics(images)

    def heatmap(self, pred: Prediction) -> np.ndarray:
        """Grad-CAM over the last feature stage: where the network looked (float (S, S) in [0, 1])."""
        from pytorch_grad_cam import GradCAM

        if pred.image is None:
            raise ValueError("prediction has no preprocessed image")
        model = self.model.eval()
        male = torch.tensor([1.0 if pred.sex == "male" else 0.0], device=self.device)

        class _Bound(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x, male.expand(x.shape[0])).unsqueeze(1)

        layer_name = model.backbone.feature_info[-1]["module"]
        target = model.backbone.get_submodule(layer_name)
        x = torch.from_numpy(pred.image).float().div(255)[None, None].to(self.device)
        with GradCAM(model=_Bound(), target_layers=[target]) as cam:
            grayscale = cam(input_tensor=x, targets=[lambda out: out.sum()])
        return np.asarray(grayscale[0], dtype=np.float32)


def _activation_grad(act: torch.nn.Module, pre: torch.Tensor) -> torch.Tensor | None:
    """d act(x) / dx at ``pre`` for the activations EfficientNet-style heads use (autograd's convention:
    ReLU's gradient is 0 at 0, ReLU6's is 0 at 0 and 6); None for any other activation."""
    if isinstance(act, torch.nn.ReLU6) or (
        isinstance(act, torch.nn.Hardtanh) and (act.min_val, act.max_val) == (0.0, 6.0)
    ):
        return ((pre > 0) & (pre < 6)).to(pre.dtype)
    if isinstance(act, torch.nn.ReLU):
        return (pre > 0).to(pre.dtype)
    if isinstance(act, torch.nn.SiLU):
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    if isinstance(act, torch.nn.Identity):
        return torch.ones_like(pre)
    return None


def cam_supported(net: BoneAgeNet) -> bool:
    """Whether Grad-CAM can be written into the graph: an EfficientNet-family backbone (stem, blocks, 1x1
    ``conv_head``, BatchNormAct ``bn2``, average pooling) whose Grad-CAM layer is its last block."""
    b = net.backbone
    if not all(hasattr(b, n) for n in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        return False
    conv = b.conv_head
    if not isinstance(conv, torch.nn.Conv2d) or conv.kernel_size != (1, 1) or conv.groups != 1:
        return False
    if not isinstance(b.bn2, torch.nn.BatchNorm2d) or getattr(b.global_pool, "pool_type", "") != "avg":
        return False
    if b.feature_info[-1]["module"] != f"blocks.{len(b.blocks) - 1}":
        return False
    act = getattr(b.bn2, "act", torch.nn.Identity())
    return _activation_grad(act, torch.zeros(1)) is not None


class _ExportGraph(torch.nn.Module):
    """(image, male) → (months, pooled features[, Grad-CAM's weighted activations]) for export.

    Grad-CAM's channel weights are the spatial mean of d months / d A, A the last block's output. Through
    global average pooling, the dense head, BatchNorm and a 1x1 convolution that gradient is a closed form:
    g = age_std · W_out · diag(ReLU'(head)) · W_hidden (per pooled channel; a label-distribution head puts
    p ⊙ (centres − E[age]) · W_out in place of age_std · W_out), times act'(bn(conv(A))) and the
    BatchNorm scale per pixel, mapped back through the 1x1 convolution's weights. Written as tensor maths it
    exports like any other layer: the heatmap needs no hooks, no backward pass and no lock.
    """

    def __init__(self, net: BoneAgeNet, cam: bool) -> None:
        super().__init__()
        self.net = net
        self.cam = cam
        # the OOD check's texture statistics, tapped from the same pass (no extra compute)
        self.texture = cam and net.supports_texture(TEXTURE_STAGE)

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.net
        if not self.cam:
            return net.forward_with_features(image, male)
        b = net.backbone
        a, texture = image, None
        for i, a in net.block_outputs(image):
            if self.texture and i == TEXTURE_STAGE:
                texture = stage_statistics(a)
        # a: the Grad-CAM layer's output
        bn = b.bn2
        pre = torch.nn.functional.batch_norm(
            b.conv_head(a), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        act = getattr(bn, "act", torch.nn.Identity())
        act_grad = _activation_grad(act, pre)
        feats = b.forward_head(act(pre.clone()))
        hidden = torch.cat([feats, net.sex(male.reshape(-1, 1).to(feats.dtype))], dim=1)
        pres = []
        for layer in net.head.hidden:
            pres.append(layer(hidden))
            hidden = torch.relu(pres[-1])
        out = net.head.out(hidden)
        months = net.to_months(out)
        if net.age_bins:  # d E[age] / d logit_k = p_k (c_k - E[age])
            p = torch.softmax(out.float(), dim=1)
            grad = (p * (net.age_centres[None, :] - months[:, None])) @ net.head.out.weight
        else:
            grad = net.head.out.weight.expand(out.shape[0], -1) * net.age_std
        for layer, p in zip(reversed(list(net.head.hidden)), reversed(pres), strict=True):
            grad = (grad * (p > 0).to(grad.dtype)) @ layer.weight
        grad = grad[:, : feats.shape[1]]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.weight is not None else 1.0
        d_pre = act_grad * (grad * scale)[:, :, None, None]  # up to the constant 1/(h·w) of the pooling
        alpha = d_pre.mean(dim=(2, 3)) @ b.conv_head.weight.flatten(1)  # (B, C of A)
        cam = (alpha[:, :, None, None] * a).sum(1)
        return (months, feats, cam) if texture is None else (months, feats, cam, texture)


_export = torch.onnx.export


def _compact_fp16(path: Path) -> None:
    """Store every fp32 initializer that fp16 holds exactly (a bundle's upcast fp16 weights) as fp16 plus a
    Cast node, which ONNX Runtime folds at load: the graph is half the size and numerically identical."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    casts, keep = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init)
        half = arr.astype(np.float16)
        if arr.size < 16 or not np.array_equal(half.astype(np.float32), arr):
            keep.append(init)
            continue
        name16 = f"{init.name}__fp16"
        keep.append(numpy_helper.from_array(half, name16))
        casts.append(helper.make_node("Cast", [name16], [init.name], to=onnx.TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.save(model, str(path))


def export_onnx(
    predictor: Predictor,
    path: str | Path,
    opset: int = 17,
    *,
    heatmap: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """The network (image, male) → (bone_age_months, features[, cam]) as ONNX with a dynamic batch axis;
    TTA, the OOD density and the heatmap's resizing stay in Python. BatchNorm is kept as its own node (not
    folded into the convolutions) so the weights stay the bundle's fp16 values and are stored as such."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = predictor.spec.preprocess.size
    net = predictor.model.eval()
    if next(net.parameters()).device.type != "cpu":  # export a CPU copy: the predictor keeps its device
        net = copy.deepcopy(net).cpu()
    cam = heatmap and cam_supported(net)
    graph = _ExportGraph(net, cam).eval()
    dummy = (torch.rand(2, 1, size, size), torch.tensor([0.0, 1.0]))
    if cam:  # the rewritten forward must give the network's own answer
        with torch.no_grad():
            ref = net.forward_with_features(*dummy)[0]
            got = graph(*dummy)[0]
        if not torch.allclose(ref, got, atol=1e-3, rtol=1e-4):
            raise RuntimeError("in-graph Grad-CAM forward does not reproduce the network's output")
    names = ["bone_age_months", "features", *(["cam"] if cam else [])]
    names += ["texture"] if graph.texture else []
    tmp = out.with_name(f".{out.name}.tmp")
    with warnings.catch_warnings():  # PRESERVE + constant folding: fine in eval mode, torch warns anyway
        warnings.simplefilter("ignore", UserWarning)
        _export(
            graph,
            dummy,
            str(tmp),
            input_names=["image", "male"],
            output_names=names,
            dynamic_axes={"image": {0: "batch"}, "male": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,  # eval mode, BatchNorm not folded (see above)
            do_constant_folding=True,
            dynamo=False,
        )
    _compact_fp16(tmp)
    if metadata:
        import onnx

        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, dict(metadata))
        onnx.save(model, str(tmp))
    tmp.replace(out)  # atomic: a concurrent reader never sees a half-written graph
    return out


def export_bundle_onnx(weights: str | Path, out: str | Path | None = None) -> Path:
    """The ``.onnx`` that ships beside a bundle (default: same name, ``.onnx``), exported from the bundle's
    own upcast weights and stamped with their digest, so ``boneage.runtime`` can tell a stale graph."""
    src = Path(weights)
    predictor = Predictor.load(src, tta=False, runtime="torch")
    meta = {ONNX_META_DIGEST: file_digest(src), ONNX_META_VERSION: ONNX_EXPORT_VERSION}
    return export_onnx(predictor, out or onnx_path_for(src), metadata=meta)


def cached_onnx_export(weights: str | Path, predictor: Predictor | None = None) -> Path:
    """The ONNX graph of a weights file, exported once into the user cache (keyed by the file's hash, the
    export version and the torch version), for checkpoints and bundles without a current ``.onnx``."""
    import os
    import tempfile

    source = Path(weights)
    digest = file_digest(source)[:16]
    root = Path(os.environ.get("BONEAGE_CACHE") or Path.home() / ".cache" / "boneage") / "onnx"
    target = root / f"{digest}-torch{torch.__version__.split('+')[0]}-v{ONNX_EXPORT_VERSION}.onnx"
    if target.is_file():
        return target
    model = predictor or Predictor.load(source, tta=False, runtime="torch")
    meta = {ONNX_META_DIGEST: file_digest(source), ONNX_META_VERSION: ONNX_EXPORT_VERSION}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root)) / "model.onnx"
    except OSError:  # read-only home: export to a temporary folder instead
        fallback = Path(tempfile.mkdtemp(prefix="boneage-onnx-")) / "model.onnx"
        return export_onnx(model, fallback, metadata=meta)
    export_onnx(model, tmp, metadata=meta)
    tmp.replace(target)  # atomic: a concurrent process never reads a half-written graph
    tmp.parent.rmdir()
    return target
