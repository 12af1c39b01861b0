"""The network as the graph both engines run: (image, male) → bone age, pooled features, Grad-CAM's map and
the OOD texture statistics, in one forward pass and without hooks; exported to ONNX beside a model file.

The ONNX engine runs the exported graph; the torch engine runs ``ExportGraph`` itself. So the heatmap's
maths is written once (here), and the parity tests compare it with hook-based Grad-CAM
(pytorch-grad-cam) on real radiographs.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from boneage.modelfile import ModelFile, file_digest, onnx_path_for, onnx_stamp
from boneage.modelfile.format import ONNX_EXPORT_VERSION
from boneage.models.net import BoneAgeNet, network_from_file, stage_statistics
from boneage.spec import ModelSpec


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


class ExportGraph(torch.nn.Module):
    """(image, male) → (months, pooled features[, Grad-CAM's weighted activations, texture statistics]):
    the graph both engines run, exported as ONNX for one and run as it is by torch for the other.

    Grad-CAM's channel weights are the spatial mean of d months / d A, A the last block's output. Through
    global average pooling, the dense head, BatchNorm and a 1x1 convolution that gradient is a closed form:
    g = age_std · W_out · diag(ReLU'(head)) · W_hidden (per pooled channel; a label-distribution head puts
    p ⊙ (centres − E[age]) · W_out in place of age_std · W_out), times act'(bn(conv(A))) and the
    BatchNorm scale per pixel, mapped back through the 1x1 convolution's weights. Written as tensor maths it
    exports like any other layer: the heatmap needs no hooks, no backward pass and no lock, and both engines
    compute it with the same maths.
    """

    def __init__(self, net: BoneAgeNet, cam: bool) -> None:
        super().__init__()
        self.net = net
        self.cam = cam
        # the OOD check's texture statistics, tapped from the same pass (no extra compute)
        self.texture = cam and net.supports_texture(net.texture_stage)
        self.output_names = ("bone_age_months", "features", *(("cam",) if cam else ()))
        self.output_names += ("texture",) if self.texture else ()

    def forward(self, image: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.net
        if not self.cam:
            return net.forward_with_features(image, male)
        b = net.backbone
        a, texture = image, None
        for i, a in net.block_outputs(image):
            if self.texture and i == net.texture_stage:
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
    net: BoneAgeNet,
    spec: ModelSpec,
    path: str | Path,
    opset: int = 17,
    *,
    heatmap: bool = True,
    metadata: dict[str, str] | None = None,
) -> Path:
    """The network (image, male) → (bone_age_months, features[, cam, texture]) as ONNX with a dynamic batch
    axis; TTA, the OOD density and the heatmap's resizing stay in Python. BatchNorm is kept as its own node
    (not folded into the convolutions) so the weights stay the bundle's fp16 values and are stored as such."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = spec.preprocess.size
    net = net.eval()
    if next(net.parameters()).device.type != "cpu":  # export a CPU copy: the caller keeps its device
        net = copy.deepcopy(net).cpu()
    cam = heatmap and cam_supported(net)
    graph = ExportGraph(net, cam).eval()
    dummy = (torch.rand(2, 1, size, size), torch.tensor([0.0, 1.0]))
    if cam:  # the rewritten forward must give the network's own answer
        with torch.no_grad():
            ref = net.forward_with_features(*dummy)[0]
            got = graph(*dummy)[0]
        if not torch.allclose(ref, got, atol=1e-3, rtol=1e-4):
            raise RuntimeError("in-graph Grad-CAM forward does not reproduce the network's output")
    names = list(graph.output_names)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():  # PRESERVE + constant folding: fine in eval mode, torch warns anyway
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
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


def export_model_file_onnx(weights: str | Path, out: str | Path | None = None) -> Path:
    """The ``.onnx`` that ships beside a model file (default: same name, ``.onnx``), exported from its own
    (upcast fp16) weights and stamped with their digest, so the ONNX engine can tell a stale graph."""
    model_file = ModelFile.read(weights)
    net = network_from_file(model_file)
    return export_onnx(
        net, model_file.spec, out or onnx_path_for(model_file.path), metadata=onnx_stamp(weights)
    )


def cached_onnx_export(weights: str | Path) -> Path:
    """The ONNX graph of a model file without a current ``.onnx`` beside it (a training checkpoint, say),
    exported once into the user cache (keyed by the file's hash, the export version and the torch version)."""
    source = Path(weights)
    digest = file_digest(source)[:16]
    root = Path(os.environ.get("BONEAGE_CACHE") or Path.home() / ".cache" / "boneage") / "onnx"
    target = root / f"{digest}-torch{torch.__version__.split('+')[0]}-v{ONNX_EXPORT_VERSION}.onnx"
    if target.is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root)) / "model.onnx"
    except OSError:  # read-only home: export to a temporary folder instead
        return export_model_file_onnx(source, Path(tempfile.mkdtemp(prefix="boneage-onnx-")) / "model.onnx")
    export_model_file_onnx(source, tmp)
    tmp.replace(target)  # atomic: a concurrent process never reads a half-written graph
    tmp.parent.rmdir()
    return target
