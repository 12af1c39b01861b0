"""Clinical inference without torch: the bundled model on ONNX Runtime, numpy TTA and an in-graph heatmap.

A clinician's ``boneage predict`` and the web app need reading, preprocessing, the network, TTA, the OOD
check and a heatmap, none of which needs torch: this module does all of it with numpy, PIL and ONNX Runtime,
so a light install (``pip install boneage[serve]``) predicts in about a second and one ``InferenceSession``
serves many threads at once. The torch ``Predictor`` (``boneage.inference``) subclasses ``BasePredictor``
here, so both engines share every clinical rule (sex from the header, refusal of non-hands, warnings).

A bundle is two files side by side: ``model.safetensors`` (spec, facts, OOD density, fp16 weights; read here
with ``safetensors.numpy``) and ``model.onnx``, exported by ``boneage.inference.export_bundle_onnx`` from
the same upcast weights. The graph's outputs are ``bone_age_months``, ``features`` (pooled, for the OOD
density), ``cam``: Grad-CAM's map at the last feature stage, computed inside the graph from the head's
weights and activation pattern, so no hooks, no gradients and no lock are needed, and ``texture`` (early
stage statistics, for the OOD check's second density).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from boneage.errors import BoneAgeInputError
from boneage.io import Radiograph, read_radiograph
from boneage.labels import parse_sex as normalize_sex
from boneage.ood import PREFIX as OOD_PREFIX
from boneage.ood import FeatureDensity, image_checks, rotation_ratios, turned
from boneage.preprocess import Preprocess, training_copy
from boneage.spec import ModelSpec, spec_from_record

BUNDLED_NAME = "model.safetensors"
TRAIN_EXTRA = "pip install 'boneage[train]'"
#: bumped when the exported graph changes (inputs, outputs, heatmap maths): older files are re-exported
ONNX_EXPORT_VERSION = "3"
ONNX_META_DIGEST = "boneage_weights_sha256"
ONNX_META_VERSION = "boneage_export_version"
ENGINES = ("auto", "onnx", "torch")

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


def onnx_path_for(weights: str | Path) -> Path:
    """The ONNX graph that ships beside a bundle: ``model.safetensors`` → ``model.onnx``."""
    return Path(weights).with_suffix(".onnx")


def file_digest(path: str | Path) -> str:
    """sha256 of a weights file: ties an exported graph to the exact weights it came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    cam: np.ndarray | None = field(default=None, repr=False)  # low-resolution Grad-CAM of the plain view

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sex": self.sex,
            "bone_age_months": round(self.bone_age_months, 2),
            "bone_age_years": round(self.bone_age_months / 12, 2),
            "uncertainty_months": round(self.uncertainty_months, 2),
            "warnings": list(self.warnings),
        }


# ---- TTA in numpy: the same views as kornia's rotate/scale (bilinear, zero padding, align_corners) -------
def _affine(angle: float, zoom: float, size: int) -> np.ndarray:
    """kornia's ``get_rotation_matrix2d`` about the centre ((S-1)/2): a forward 2x3 pixel-space map."""
    c = (size - 1) / 2.0
    a = math.cos(math.radians(angle)) * zoom
    b = math.sin(math.radians(angle)) * zoom
    return np.array([[a, b, (1 - a) * c - b * c], [-b, a, b * c + (1 - a) * c]], dtype=np.float64)


def _warp(images: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """dst(x, y) = src(M⁻¹(x, y)) with bilinear sampling; corners outside the image contribute zero."""
    n, h, w = images.shape
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    wx, wy = (sx - x0).astype(np.float32), (sy - y0).astype(np.float32)
    out = np.zeros((n, h, w), dtype=np.float32)
    for dy, dx, weight in (
        (0, 0, (1 - wx) * (1 - wy)),
        (0, 1, wx * (1 - wy)),
        (1, 0, (1 - wx) * wy),
        (1, 1, wx * wy),
    ):
        xi, yi = x0 + dx, y0 + dy
        valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        vals = images[:, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
        out += np.where(valid, weight, 0.0).astype(np.float32) * vals
    return out


def tta_views(images: np.ndarray, views: list[tuple[bool, float, float]]) -> np.ndarray:
    """(B, 1, S, S) float → (V·B, 1, S, S), view-major: the views ``boneage.inference.tta_batch`` makes."""
    x = np.asarray(images, dtype=np.float32)
    out = []
    for flip, angle, zoom in views:
        v = x[..., ::-1] if flip else x
        if angle or zoom != 1.0:
            b, c, h, w = v.shape
            flat = np.ascontiguousarray(v).reshape(b * c, h, w)
            if angle:
                flat = _warp(flat, _affine(angle, 1.0, w))
            if zoom != 1.0:
                flat = _warp(flat, _affine(0.0, zoom, w))
            v = flat.reshape(b, c, h, w)
        out.append(np.ascontiguousarray(v))
    return np.concatenate(out, 0)


# ---- heatmap post-processing: pytorch-grad-cam's scale_cam_image, in numpy ------------------------------
def _resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's INTER_LINEAR (half-pixel centres, edges replicated) for a small map → (size, size)."""
    h, w = img.shape

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(size, dtype=np.float64) + 0.5) * (n_in / size) - 0.5
        lo = np.floor(pos).astype(np.int64)
        frac = (pos - lo).astype(np.float32)
        return np.clip(lo, 0, n_in - 1), np.clip(lo + 1, 0, n_in - 1), frac

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    return (top * (1 - fy)[:, None] + bottom * fy[:, None]).astype(np.float32)


def cam_to_heatmap(cam: np.ndarray, size: int) -> np.ndarray:
    """Low-resolution weighted activations → the Grad-CAM map (float (S, S) in [0, 1]) as pytorch-grad-cam
    draws it: ReLU, min-max scaling, bilinear resize, and scaling again."""
    img = np.maximum(np.asarray(cam, dtype=np.float32), 0)
    img = img - img.min()
    img = img / (1e-7 + img.max())
    img = np.maximum(_resize_bilinear(img, size), 0)
    img = img - img.min()
    return (img / (1e-7 + img.max())).astype(np.float32)


# ---- reading a bundle without torch ----------------------------------------------------------------------
def read_bundle(path: str | Path) -> tuple[dict[str, Any], ModelSpec, FeatureDensity | None]:
    """(facts, spec, OOD density) of a ``.safetensors`` bundle, in the current or v0.1 layout, with numpy."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("boneage", "{}"))
            names = set(f.keys())
            wanted = [k for k in names if k.startswith(OOD_PREFIX) or k in {"age_mean", "age_std"}]
            small = {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in wanted}
    except Exception as exc:
        raise BoneAgeInputError(f"not a readable safetensors file ({type(exc).__name__})", p) from None
    if not isinstance(meta, dict) or not ({"spec", "config"} & set(meta)):
        raise BoneAgeInputError("safetensors file has no boneage metadata", p)
    state = {k: float(v.reshape(-1)[0]) for k, v in small.items() if k in {"age_mean", "age_std"}}
    spec = spec_from_record(meta, state, p)
    facts = {k: v for k, v in meta.items() if k not in {"spec", "config"}}
    ood = FeatureDensity.from_tensors({k: v for k, v in small.items() if k.startswith(OOD_PREFIX)})
    return facts, spec, ood


def oriented_pixels(rad: Radiograph) -> np.ndarray:
    """The radiograph's pixels as a left hand: a right hand (DICOM laterality R) mirrored."""
    return rad.pixels[:, ::-1] if rad.laterality == "R" else rad.pixels


class BasePredictor:
    """Preprocessing, TTA averaging and the clinical rules around a network; subclasses run the network.

    ``_forward_views`` takes a batch of plain images and returns the months and pooled features of every
    TTA view (view-major) and, when the engine has it, the low-resolution heatmap of each view.
    """

    thread_safe = False  # True: predict/heatmap may run in many threads at once (no hooks, no shared state)

    def __init__(self, spec: ModelSpec, meta: dict[str, Any] | None = None, *, tta: bool = True) -> None:
        self.spec = spec
        self.meta = meta or {}
        self.preprocess = Preprocess.from_config(spec.preprocess)
        self.views = TTA_VIEWS if tta else TTA_VIEWS[:1]
        self.ood: FeatureDensity | None = None  # the bundle's "is this a hand radiograph?" density

    def _forward_views(
        self, images: np.ndarray, male: np.ndarray, views: list[tuple[bool, float, float]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def heatmap(self, pred: Prediction) -> np.ndarray | None:
        raise NotImplementedError

    def texture_statistics(self, images: np.ndarray) -> np.ndarray | None:
        """Early-stage statistics of preprocessed uint8 images (N, S, S) for the texture density; None
        when this engine's network does not provide them."""
        return None

    def plain_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Pooled features and texture statistics (None without them) of plain views of preprocessed uint8
        images (N, S, S). Both come before the sex input, so none is needed."""
        feats = self._run_arrays(images, np.zeros(len(images), bool), 16, self.views[:1])[3]
        return feats, self.texture_statistics(images)

    def refusal_scores(
        self, pixels: np.ndarray, input_score: float | None = None
    ) -> tuple[float | None, float | None]:
        """(pooled, texture) density scores that the refusal rule judges, for a radiograph's pixels.

        Both densities were fitted on the training copies (squashed to 299 px, JPEG quality 60), and a
        clinic's full-resolution file scores higher than its own copy: 7 of the 1,001 held-out native PNGs
        were refused by the pooled density against 4 of their copies (v0.5 bundle facts). So, when the
        density's ``copy_recipe`` says the model was trained on such copies, the input is first remade the
        same way (``training_copy``) and both scores come from one plain pass over that copy. Otherwise both
        come from the model's own input (``input_score``: its pooled score, when already computed)."""
        if self.ood is None:
            return input_score, None
        size, quality = self.ood.copy_recipe
        texture = self.ood.texture
        if size <= 0 and input_score is not None and texture is None:
            return input_score, None
        remade = training_copy(pixels, size, quality) if size > 0 else pixels
        feats, stats = self.plain_outputs(self.preprocess(remade)[None])
        pooled = input_score if size <= 0 and input_score is not None else float(self.ood.score(feats)[0])
        if texture is None or stats is None or not stats.size:
            return pooled, None
        return pooled, float(texture.score(stats)[0])

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

    def _run_arrays(
        self, images: np.ndarray, male: np.ndarray, batch_size: int, views: list[tuple[bool, float, float]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        means, spreads, all_views, first_feats, first_cams = [], [], [], [], []
        v = len(views)
        for start in range(0, len(images), batch_size):
            x = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)[:, None] / 255.0
            s = np.asarray(male[start : start + batch_size], dtype=np.float32)
            months, feats, cam = self._forward_views(x, s, views)
            out = np.asarray(months, dtype=np.float32).reshape(v, -1)
            means.append(out.mean(0))
            spreads.append(out.std(0) if v > 1 else np.zeros(out.shape[1], dtype=np.float32))
            all_views.append(out.T)
            first_feats.append(feats[: out.shape[1]])
            first_cams.append(None if cam is None else cam[: out.shape[1]])
        if not means:
            empty = np.zeros(0, dtype=np.float32)
            return empty, empty, np.zeros((0, v), np.float32), np.zeros((0, 0), np.float32), None
        cams = None if any(c is None for c in first_cams) else np.concatenate(first_cams)
        return (
            np.concatenate(means),
            np.concatenate(spreads),
            np.concatenate(all_views),
            np.concatenate(first_feats),
            cams,
        )

    def predict_arrays(
        self, images: np.ndarray, male: np.ndarray, batch_size: int = 16, *, features: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Preprocessed uint8 images (N, S, S) → (mean, spread, per-view) bone age in months, and with
        ``features`` also the pooled features of the plain (first) view, for the OOD check."""
        mean, spread, views, feats, _ = self._run_arrays(images, male, batch_size, self.views)
        return (mean, spread, views, feats) if features else (mean, spread, views)

    def ood_scores(self, images: np.ndarray, male: np.ndarray) -> np.ndarray:
        """The OOD density's score per preprocessed image (NaN without a density in the bundle)."""
        if self.ood is None:
            return np.full(len(images), np.nan)
        feats = self._run_arrays(images, male, 16, self.views[:1])[3]
        return self.ood.score(feats)

    def prepare(
        self, image: str | Path | bytes | Radiograph, name: str | None = None
    ) -> tuple[Radiograph, np.ndarray, list[str]]:
        """Read and preprocess; a right hand (DICOM laterality R) is mirrored to look like the left."""
        rad = image if isinstance(image, Radiograph) else read_radiograph(image, name=name)
        warnings = []
        if rad.laterality == "R":
            warnings.append("right hand (DICOM laterality R) mirrored to match the left-hand training data")
        return rad, self.preprocess(oriented_pixels(rad)), warnings

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
        mean, spread, views, feats, cams = self._run_arrays(
            prepared[None], np.array([final == "male"]), 16, self.views
        )
        input_score = float(self.ood.score(feats)[0]) if self.ood is not None else None
        ood_score, texture_score = self.refusal_scores(oriented_pixels(rad), input_score)
        self.check_distribution(prepared, ood_score, rad.source, texture_score)
        # the orientation rule compares the input with its turned versions: all scored as the model sees them
        warnings += self.orientation_warnings(prepared, final == "male", input_score, feats)
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
            cam=None if cams is None else cams[0],
        )
        pred.warnings += self.plausibility_warnings(pred)
        return pred

    def orientation_warnings(
        self, prepared: np.ndarray, male: bool, ood_score: float | None, features: np.ndarray
    ) -> list[str]:
        """A hand turned by 90/180 degrees or upside down still looks like a hand to the density. Bundles
        with an orientation probe (``boneage.ood.OrientationProbe``) ask it, from the features already
        computed, and confirm a doubt with the density of the turned image (``ORIENTATION_CONFIRM_RATIO``);
        older ones compare the density score with that of the image turned each way."""
        if self.ood is None or ood_score is None:
            return []
        probe = self.ood.orientation
        if probe is not None:
            upright = float(probe.upright_probability(features[:1])[0])
            if upright >= probe.limit:
                return []  # the common case: no extra forward passes
        elif not np.isfinite(self.ood.rotation_ratio):
            return []
        others = self.ood_scores(turned(prepared[None]), np.full(4, male))
        ratio = rotation_ratios(np.array([ood_score]), others)
        if not self.ood.looks_turned(features[:1], ratio)[0]:
            return []
        if probe is not None:
            return [
                f"the hand looks rotated or upside down (most likely {probe.likely_turn(features[:1])[0]}; "
                f"upright probability {upright:.2f}): check the orientation, the bone age may be wrong"
            ]
        return [
            "the hand looks rotated or upside down (it resembles the training radiographs far more when "
            f"turned; ratio {float(ratio[0]):.1f}, limit {self.ood.rotation_ratio:.1f}): check the "
            "orientation, the bone age may be wrong"
        ]

    def check_distribution(
        self,
        prepared: np.ndarray,
        ood_score: float | None,
        source: object,
        texture_score: float | None = None,
    ) -> None:
        """Refuse an input that is not a hand radiograph like the training ones: a bone age for it would
        look confident and normal and mean nothing (see ``boneage.ood``)."""
        reasons = image_checks(prepared)
        if ood_score is not None and self.ood is not None and self.ood.refuses(ood_score):
            reasons.append(
                f"its image features are far from those of the training radiographs (unusualness "
                f"{ood_score:.1f}, limit {self.ood.threshold:.1f})"
            )
        texture = self.ood.texture if self.ood is not None else None
        if texture_score is not None and texture is not None and texture.refuses(texture_score):
            reasons.append(
                f"its fine image texture is unlike that of the training radiographs (unusualness "
                f"{texture_score:.1f}, limit {texture.threshold:.1f})"
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


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session; ``threads`` caps intra-op threads (1 per worker thread when serving:
    concurrent ``run`` calls then each use their own core instead of fighting over one pool)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        if threads == 1:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_metadata(session: Any) -> dict[str, str]:
    """The graph's ``metadata_props`` (which weights it was exported from, by which export version)."""
    return dict(session.get_modelmeta().custom_metadata_map)


def _current_session(weights: Path, threads: int | None) -> Any | None:
    """A session on the ONNX graph beside ``weights`` when it was exported (by this export version) from
    these bytes; None when it is missing, unreadable or stale."""
    candidate = onnx_path_for(weights)
    if not candidate.is_file():
        return None
    try:
        session = onnx_session(candidate, threads)
    except Exception:  # onnxruntime raises its own exception types for a damaged file
        return None
    meta = onnx_metadata(session)
    if meta.get(ONNX_META_VERSION) != ONNX_EXPORT_VERSION:
        return None
    if meta.get(ONNX_META_DIGEST) != file_digest(weights):
        return None
    return session


def plain_run(session: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """One run of an exported graph on plain (un-augmented) views, outputs by name: the OOD features and
    texture statistics come from here for both engines, so they cannot drift apart."""
    names = [o.name for o in session.get_outputs()]
    x = np.ascontiguousarray(images, dtype=np.float32)[:, None] / 255.0
    male = np.zeros(len(x), dtype=np.float32)  # features and texture come before the sex input
    return dict(zip(names, session.run(None, {"image": x, "male": male}), strict=True))


class OnnxPredictor(BasePredictor):
    """The bundled model on ONNX Runtime: no torch, one session shared by every thread."""

    thread_safe = True

    def __init__(
        self,
        session: Any,
        spec: ModelSpec,
        meta: dict[str, Any] | None = None,
        *,
        tta: bool = True,
        ood: FeatureDensity | None = None,
    ) -> None:
        super().__init__(spec, meta, tta=tta)
        self.session = session
        self.ood = ood
        self.outputs = [o.name for o in session.get_outputs()]
        self.has_cam = "cam" in self.outputs

    @classmethod
    def load(
        cls, path: str | Path | None = None, *, tta: bool = True, threads: int | None = None
    ) -> OnnxPredictor:
        """``path`` None → the bundled model; a ``.safetensors`` bundle runs the ``.onnx`` beside it. A
        missing or stale graph (or a ``.ckpt``) is exported when torch is installed, else a one-line error."""
        p = Path(path) if path is not None else bundled_model_path()
        if not p.is_file():
            if path is None:
                raise BoneAgeInputError("no bundled model in this installation; pass --checkpoint CKPT")
            raise BoneAgeInputError("checkpoint not found", p)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BoneAgeInputError(
                "onnxruntime is not installed (pip install onnxruntime, or use --engine torch)"
            ) from None
        if p.suffix == ".safetensors":
            facts, spec, ood = read_bundle(p)
            session = _current_session(p, threads)
            if session is None:
                graph = _export_with_torch(p, f"no up-to-date {onnx_path_for(p).name} beside this model")
                session = onnx_session(graph, threads)
            return cls(session, spec, facts, tta=tta, ood=ood)
        else:
            graph = _export_with_torch(p, "a training checkpoint")
            from boneage.inference import read_model_file

            facts, spec, state = read_model_file(p)
            ood = FeatureDensity.from_tensors(
                {k: v.numpy() for k, v in state.items() if k.startswith(OOD_PREFIX)}
            )
        return cls(onnx_session(graph, threads), spec, facts, tta=tta, ood=ood)

    def _forward_views(
        self, images: np.ndarray, male: np.ndarray, views: list[tuple[bool, float, float]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        batch = tta_views(images, views)
        sexes = np.tile(male.astype(np.float32), len(views))
        out = dict(zip(self.outputs, self.session.run(None, {"image": batch, "male": sexes}), strict=True))
        months = np.asarray(out["bone_age_months"], dtype=np.float32).reshape(-1)
        feats = np.asarray(out.get("features", np.zeros((len(months), 0))), dtype=np.float32)
        cam = out.get("cam")
        return months, feats, None if cam is None else np.asarray(cam, dtype=np.float32)

    def _plain_run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return plain_run(self.session, images)

    def texture_statistics(self, images: np.ndarray) -> np.ndarray | None:
        """The graph's ``texture`` output for plain views of ``images``; None for a graph without it."""
        if "texture" not in self.outputs:
            return None
        return np.asarray(self._plain_run(images)["texture"], dtype=np.float32)

    def plain_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Pooled features and texture statistics of plain views from one run of the graph."""
        out = self._plain_run(images)
        texture = out.get("texture")
        feats = out.get("features", np.zeros((len(images), 0)))
        stats = None if texture is None else np.asarray(texture, dtype=np.float32)
        return np.asarray(feats, dtype=np.float32), stats

    def heatmap(self, pred: Prediction) -> np.ndarray | None:
        """Grad-CAM over the last feature stage (float (S, S) in [0, 1]); None for a graph without one."""
        if pred.image is None:
            raise ValueError("prediction has no preprocessed image")
        if not self.has_cam:
            return None
        cam = pred.cam
        if cam is None:
            male = np.array([pred.sex == "male"])
            cam = self._run_arrays(pred.image[None], male, 1, self.views[:1])[4][0]
        return cam_to_heatmap(cam, pred.image.shape[-1])


def _export_with_torch(path: Path, what: str) -> Path:
    """Export the ONNX graph of ``path`` with the training stack, or say in one line how to get one."""
    try:
        from boneage.inference import cached_onnx_export
    except ImportError:
        raise BoneAgeInputError(
            f"{what}: the ONNX graph must be exported with the training stack ({TRAIN_EXTRA}), e.g. "
            f"`boneage export --checkpoint {path} --out {onnx_path_for(path)}`",
            path,
        ) from None
    return cached_onnx_export(path)


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load_predictor(
    path: str | Path | None = None,
    *,
    engine: str = "auto",
    tta: bool = True,
    threads: int | None = None,
    runtime: str = "auto",
) -> BasePredictor:
    """The predictor for ``engine``: ``onnx`` (no torch), ``torch`` (the research ``Predictor``, whose
    network runs on ``runtime``), or ``auto`` (onnx when onnxruntime is installed)."""
    if engine not in ENGINES:
        raise BoneAgeInputError(f"unknown engine {engine!r} (auto, onnx or torch)")
    if engine == "onnx" or (engine == "auto" and onnx_available()):
        return OnnxPredictor.load(path, tta=tta, threads=threads)
    try:
        from boneage.inference import Predictor
    except ImportError:
        raise BoneAgeInputError(
            f"the torch engine needs the training stack ({TRAIN_EXTRA}); or install onnxruntime"
        ) from None
    return Predictor.load(path, tta=tta, runtime=runtime)
