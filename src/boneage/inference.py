"""``Predictor``: load a checkpoint or the bundled model once, then predict bone age with TTA.

A checkpoint or bundle carries its ``ModelSpec`` (preprocessing, backbone, target statistics) and nothing
about how it was trained, so the predictor rebuilds the exact training-time input from a raw file with nothing
else to go on. The bundled model is fp16 safetensors with the spec and model-card facts in the file's
metadata (written by ``boneage.bundle``). Files of the v0.1 layout, which carried the whole training config,
are converted on load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boneage.errors import BoneAgeInputError
from boneage.io import Radiograph, read_radiograph
from boneage.labels import parse_sex as normalize_sex
from boneage.models import BoneAgeNet, read_state_dict
from boneage.ood import PREFIX as OOD_PREFIX
from boneage.ood import FeatureDensity, image_checks
from boneage.preprocess import Preprocess
from boneage.spec import ModelSpec, spec_from_record

BUNDLED_NAME = "model.safetensors"

# (horizontal flip, rotation in degrees, zoom): small, label-preserving views whose spread is the uncertainty
TTA_VIEWS: list[tuple[bool, float, float]] = [
    (False, 0.0, 1.0),
    (True, 0.0, 1.0),
    (False, 8.0, 1.0),
    (False, -8.0, 1.0),
    (False, 0.0, 0.92),
    (True, 0.0, 1.08),
]


def bundled_model_path() -> Path:
    return Path(str(resources.files("boneage") / "assets" / BUNDLED_NAME))


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


@dataclass
class Prediction:
    """A bone-age estimate for one radiograph, plus what the clinical layer needs to report it."""

    source: str
    sex: str
    bone_age_months: float
    uncertainty_months: float
    views_months: list[float]
    radiograph: Radiograph | None = None
    image: np.ndarray | None = None  # the preprocessed uint8 input the model saw
    warnings: list[str] = field(default_factory=list)
    ood_score: float | None = None  # unusualness under the bundle's feature density (about 1: typical)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sex": self.sex,
            "bone_age_months": round(self.bone_age_months, 2),
            "bone_age_years": round(self.bone_age_months / 12, 2),
            "uncertainty_months": round(self.uncertainty_months, 2),
            "warnings": list(self.warnings),
        }


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
    state = read_state_dict(path)
    record = {"spec": blob["boneage_spec"]} if "boneage_spec" in blob else hp
    if not ({"spec", "config"} & set(record)):
        raise BoneAgeInputError("checkpoint has no boneage model spec (not from boneage train?)", path)
    spec = spec_from_record(record, state, path)
    if "spec" in record and "boneage_spec" not in blob:  # hyper-parameters hold the spec before fitting
        spec.target_mean, spec.target_std = float(state["age_mean"]), float(state["age_std"])
    return {"source": str(path)}, spec, state


class Predictor:
    """Model + preprocessing + TTA; ``runtime='onnx'`` runs the network through onnxruntime on the CPU."""

    def __init__(
        self,
        model: BoneAgeNet,
        spec: ModelSpec,
        meta: dict[str, Any] | None = None,
        *,
        device: str = "cpu",
        tta: bool = True,
    ) -> None:
        self.model = model.eval().to(device)
        self.spec = spec
        self.meta = meta or {}
        self.device = torch.device(device)
        self.preprocess = Preprocess.from_config(spec.preprocess)
        self.views = TTA_VIEWS if tta else TTA_VIEWS[:1]
        self.onnx_session: Any = None
        self.ood: FeatureDensity | None = None  # the bundle's "is this a hand radiograph?" density
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

    def use_onnx(self, path: str | Path | None = None, *, required: bool = True) -> bool:
        """Switch the network to onnxruntime (exported on the fly unless ``path`` names an .onnx file)."""
        try:
            import onnxruntime as ort
        except ImportError:
            if required:
                raise BoneAgeInputError(
                    "onnxruntime is not installed (pip install 'boneage[onnx]')"
                ) from None
            return False
        if path is None:
            path = self._exported_onnx()
        opts = ort.SessionOptions()
        self.onnx_session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return True

    def _exported_onnx(self) -> Path:
        """The ONNX graph of these weights, exported once and kept in the user cache (keyed by the weights
        file's hash and the torch version), so a CLI call or server start pays ~0.1 s instead of ~1.5 s."""
        import hashlib
        import os
        import tempfile

        source = self.weights_path
        if source is None or not Path(source).is_file():
            target = Path(tempfile.mkdtemp(prefix="boneage-onnx-")) / "model.onnx"
            return export_onnx(self, target)
        digest = hashlib.sha1(Path(source).read_bytes()).hexdigest()[:16]
        root = Path(os.environ.get("BONEAGE_CACHE") or Path.home() / ".cache" / "boneage") / "onnx"
        target = root / f"{digest}-torch{torch.__version__.split('+')[0]}-feat.onnx"
        if target.is_file():
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root)) / "model.onnx"
        except OSError:  # read-only home: export to a temporary folder instead
            return export_onnx(self, Path(tempfile.mkdtemp(prefix="boneage-onnx-")) / "model.onnx")
        export_onnx(self, tmp)
        tmp.replace(target)  # atomic: a concurrent process never reads a half-written graph
        tmp.parent.rmdir()
        return target

    # ---- prediction ----------------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """Model facts for reports and the API: backbone, input size, validation MAE when known."""
        facts = {k: v for k, v in self.meta.items() if k not in {"config", "spec"}}
        facts.update({"backbone": self.spec.backbone, "input_size": self.spec.preprocess.size})
        return facts

    @property
    def training_range(self) -> tuple[float, float] | None:
        """The bone ages (months) the model was trained on, as its bundle records them."""
        rng = self.meta.get("training_range_months")
        return (float(rng[0]), float(rng[1])) if isinstance(rng, list | tuple) and len(rng) == 2 else None

    def _network(self, images: torch.Tensor, male: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(months (B,), pooled features (B, D)) from either runtime."""
        if self.onnx_session is not None:
            out = self.onnx_session.run(None, {"image": images.numpy(), "male": male.numpy()})
            feats = out[1] if len(out) > 1 else np.zeros((len(out[0]), 0), np.float32)
            return np.asarray(out[0], dtype=np.float32).reshape(-1), np.asarray(feats, dtype=np.float32)
        with torch.inference_mode():
            months, feats = self.model.forward_with_features(images.to(self.device), male.to(self.device))
            return months.float().cpu().numpy(), feats.float().cpu().numpy()

    def predict_arrays(
        self, images: np.ndarray, male: np.ndarray, batch_size: int = 16, *, features: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Preprocessed uint8 images (N, S, S) → (mean, spread, per-view) bone age in months, and with
        ``features`` also the pooled features of the plain (first) view, for the OOD check."""
        means, spreads, all_views, first_feats = [], [], [], []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).float().div_(255)
            x = x.unsqueeze(1)
            s = torch.as_tensor(np.asarray(male[start : start + batch_size], dtype=np.float32))
            v = len(self.views)
            months, feats = self._network(tta_batch(x, self.views), s.repeat(v))
            out = months.reshape(v, -1)
            means.append(out.mean(0))
            spreads.append(out.std(0) if v > 1 else np.zeros(out.shape[1], dtype=np.float32))
            all_views.append(out.T)
            first_feats.append(feats[: out.shape[1]])
        if not means:
            empty = np.zeros(0, dtype=np.float32)
            result: tuple[np.ndarray, ...] = (empty, empty, np.zeros((0, len(self.views)), dtype=np.float32))
            return (*result, np.zeros((0, 0), np.float32)) if features else result
        result = (np.concatenate(means), np.concatenate(spreads), np.concatenate(all_views))
        return (*result, np.concatenate(first_feats)) if features else result

    def ood_scores(self, images: np.ndarray, male: np.ndarray) -> np.ndarray:
        """The OOD density's score per preprocessed image (NaN without a density in the bundle)."""
        if self.ood is None:
            return np.full(len(images), np.nan)
        plain_views, self.views = self.views, self.views[:1]
        try:
            feats = self.predict_arrays(images, male, features=True)[3]
        finally:
            self.views = plain_views
        return self.ood.score(feats)

    def prepare(
        self, image: str | Path | bytes | Radiograph, name: str | None = None
    ) -> tuple[Radiograph, np.ndarray, list[str]]:
        """Read and preprocess; a right hand (DICOM laterality R) is mirrored to look like the left."""
        rad = image if isinstance(image, Radiograph) else read_radiograph(image, name=name)
        pixels, warnings = rad.pixels, []
        if rad.laterality == "R":
            pixels = pixels[:, ::-1]
            warnings.append("right hand (DICOM laterality R) mirrored to match the left-hand training data")
        return rad, self.preprocess(pixels), warnings

    def predict(
        self,
        image: str | Path | bytes | Radiograph,
        sex: str | bool | None = None,
        *,
        name: str | None = None,
    ) -> Prediction:
        """Bone age of one radiograph; ``sex`` may come from the DICOM header, and a given flag wins."""
        rad, prepared, warnings = self.prepare(image, name=name)
        given = normalize_sex(sex, rad.source)
        header = rad.sex
        if given and header and given != header:
            warnings.append(f"sex given as {given} but the DICOM header says {header}; using {given}")
        final = given or header
        if final is None:
            raise BoneAgeInputError(
                "sex is required (--sex female|male) and the file does not state it", rad.source
            )
        mean, spread, views, feats = self.predict_arrays(
            prepared[None], np.array([final == "male"]), features=True
        )
        ood_score = float(self.ood.score(feats)[0]) if self.ood is not None else None
        self.check_distribution(prepared, ood_score, rad.source)
        pred = Prediction(
            rad.source,
            final,
            float(mean[0]),
            float(spread[0]),
            [float(v) for v in views[0]],
            radiograph=rad,
            image=prepared,
            warnings=warnings,
            ood_score=ood_score,
        )
        pred.warnings += self.plausibility_warnings(pred)
        return pred

    def check_distribution(self, prepared: np.ndarray, ood_score: float | None, source: object) -> None:
        """Refuse an input that is not a hand radiograph like the training ones: a bone age for it would
        look confident and normal and mean nothing (see ``boneage.ood``)."""
        reasons = image_checks(prepared)
        if ood_score is not None and self.ood is not None and ood_score > self.ood.threshold:
            reasons.append(
                f"its image features are far from those of the training radiographs (unusualness "
                f"{ood_score:.1f}, limit {self.ood.threshold:.1f})"
            )
        if reasons:
            raise BoneAgeInputError(
                "does not look like a PA left-hand radiograph like those the model was trained on ("
                + "; ".join(reasons)
                + "); no bone age estimated",
                source,
            )

    def plausibility_warnings(self, pred: Prediction) -> list[str]:
        """Flags for an input unlike a hand radiograph: the views disagree far more than on real hands."""
        out = []
        limit = float(self.meta.get("tta_spread_p99_months", 12.0))
        if pred.uncertainty_months > limit:
            out.append(
                f"the prediction is unstable across test-time views (±{pred.uncertainty_months:.1f} months, "
                f"more than {limit:.1f} seen on 99% of training radiographs): is this a left-hand radiograph?"
            )
        if not math.isfinite(pred.bone_age_months):
            out.append("the model returned no finite prediction")
        return out

    def heatmap(self, pred: Prediction) -> np.ndarray:
        """Grad-CAM over the last feature stage: where the network looked (float (S, S) in [0, 1])."""
        from pytorch_grad_cam import GradCAM

        if pred.image is None:
            raise ValueError("prediction has no preprocessed image")
        model = self.model.float().eval()
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


def export_onnx(predictor: Predictor, path: str | Path, opset: int = 17) -> Path:
    """The network (image, male) → (months, pooled features) as ONNX with a dynamic batch axis; TTA and
    the OOD density stay in Python."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = predictor.spec.preprocess.size
    net = predictor.model.float().eval().cpu()

    class _WithFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image: torch.Tensor, male: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.net.forward_with_features(image, male)

    dummy = (torch.rand(2, 1, size, size), torch.tensor([0.0, 1.0]))
    torch.onnx.export(
        _WithFeatures(),
        dummy,
        str(out),
        input_names=["image", "male"],
        output_names=["bone_age_months", "features"],
        dynamic_axes={
            "image": {0: "batch"},
            "male": {0: "batch"},
            "bone_age_months": {0: "batch"},
            "features": {0: "batch"},
        },
        opset_version=opset,
        dynamo=False,
    )
    return out
