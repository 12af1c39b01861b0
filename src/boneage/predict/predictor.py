"""The clinical policy around a network, shared by every engine: read and orient the radiograph, preprocess
it as the model was trained, average the test-time views, refuse what is not a hand radiograph like the
training ones, warn about a turned hand or unstable views, and draw the heatmap.

An engine only runs the network (``Engine.run``): ONNX Runtime (``onnx_engine``, no torch) or torch
(``torch_engine``). Both run the same graph (``boneage.models.export.ExportGraph``) on the same views
(``views``), so every rule here applies identically whichever engine a user picks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from boneage.data.io import Radiograph, read_radiograph
from boneage.data.labels import parse_sex
from boneage.data.preprocess import Preprocess, training_copy
from boneage.errors import BoneAgeInputError
from boneage.modelfile import ModelFacts
from boneage.ood import FeatureDensity, image_checks, rotation_ratios, turned
from boneage.ood.frame import WHOLE_HAND_UPRIGHT_LIMIT, cut_reasons, frame_sideways, frame_upright
from boneage.ood.polarity import (
    POLARITY_CORRECT_LOG_RATIO,
    POLARITY_CORRECTED_NOTE,
    POLARITY_DOUBT_LOG_RATIO,
    polarity_log_ratio,
    polarity_verdict,
)
from boneage.predict.views import TTA_VIEWS, View, cam_to_heatmap, tta_views
from boneage.spec import ModelSpec

#: views disagreeing by more than this (months) draw the "unstable" warning when a model file states none
DEFAULT_SPREAD_LIMIT_MONTHS = 12.0


class Engine(Protocol):
    """Runs the network: (N, 1, S, S) float32 in [0, 1] and (N,) male → outputs by name
    (``bone_age_months`` (N,), ``features`` (N, D), and when the graph has them ``cam`` (N, h, w) and
    ``texture`` (N, T))."""

    name: str
    thread_safe: bool
    outputs: tuple[str, ...]

    def run(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray]: ...


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
    ood_score: float | None = None  # unusualness under the model file's feature density (about 1: typical)
    cam: np.ndarray | None = field(default=None, repr=False)  # low-resolution Grad-CAM of the plain view
    # the warnings (each also in ``warnings``, first) saying the image may not be what the model expects:
    # turned, not a whole upright hand, unstable views. With any, no advanced/delayed flag is a finding.
    cautions: list[str] = field(default_factory=list)
    inverted: bool = False  # the image looked like a negative and was assessed inverted back

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sex": self.sex,
            "bone_age_months": round(self.bone_age_months, 2),
            "bone_age_years": round(self.bone_age_months / 12, 2),
            "uncertainty_months": round(self.uncertainty_months, 2),
            "warnings": list(self.warnings),
            "cautions": list(self.cautions),
        }


@dataclass
class Screen:
    """What ``Predictor.polarity_check`` found before the network's views run (issue #43 item 5)."""

    pooled: float | None = None  # the refusal scores of the image assessed (remade as a training copy)
    texture: float | None = None
    polarity: float | None = None  # log(score / score of the inverse), summed over the densities
    inverted: np.ndarray | None = None  # the pixels inverted back, when the image is assessed so
    copy: np.ndarray | None = None  # the assessed image remade as a training copy (the frame checks read it)


def oriented_pixels(rad: Radiograph) -> np.ndarray:
    """The radiograph's pixels as a left hand: a right hand (DICOM laterality R) mirrored."""
    return rad.pixels[:, ::-1] if rad.laterality == "R" else rad.pixels


class Predictor:
    """A model file's network behind one engine, with the clinical rules every engine shares."""

    def __init__(
        self,
        engine: Engine,
        spec: ModelSpec,
        facts: ModelFacts | None = None,
        density: FeatureDensity | None = None,
        *,
        tta: bool = True,
        source: Path | None = None,
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.facts = facts or ModelFacts()
        self.ood = density  # "is this a hand radiograph like the training ones?"
        self.source = source  # the model file, when loaded from one
        self.preprocess = Preprocess.from_config(spec.preprocess)
        self.views: list[View] = TTA_VIEWS if tta else TTA_VIEWS[:1]

    @property
    def thread_safe(self) -> bool:
        return self.engine.thread_safe

    @property
    def has_heatmap(self) -> bool:
        return "cam" in self.engine.outputs

    # ---- running the network ------------------------------------------------------------------------------
    def _run_arrays(
        self, images: np.ndarray, male: np.ndarray, batch_size: int, views: list[View]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(mean, spread, per-view months, plain-view features, plain-view cams) of uint8 images (N, S, S)."""
        means, spreads, all_views, first_feats, first_cams = [], [], [], [], []
        v = len(views)
        for start in range(0, len(images), batch_size):
            x = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)[:, None] / 255.0
            s = np.asarray(male[start : start + batch_size], dtype=np.float32)
            out = self.engine.run(tta_views(x, views), np.tile(s, v))
            months = np.asarray(out["bone_age_months"], dtype=np.float32).reshape(v, -1)
            n = months.shape[1]
            means.append(months.mean(0))
            spreads.append(months.std(0) if v > 1 else np.zeros(n, dtype=np.float32))
            all_views.append(months.T)
            first_feats.append(np.asarray(out["features"], dtype=np.float32)[:n])
            cam = out.get("cam")
            first_cams.append(None if cam is None else np.asarray(cam, dtype=np.float32)[:n])
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
        ``features`` the pooled features of each image's plain view (what the OOD density models)."""
        mean, spread, views, feats, _ = self._run_arrays(images, male, batch_size, self.views)
        return (mean, spread, views, feats) if features else (mean, spread, views)

    def plain_outputs(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Pooled features and texture statistics (None when the graph has none) of plain views of uint8
        images (N, S, S), from one pass. Both come before the sex input, so none is needed."""
        feats, texture = [], []
        for start in range(0, len(images), batch_size):
            x = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)[:, None] / 255.0
            out = self.engine.run(x, np.zeros(len(x), dtype=np.float32))
            feats.append(np.asarray(out["features"], dtype=np.float32))
            if "texture" in out:
                texture.append(np.asarray(out["texture"], dtype=np.float32))
        if not feats:
            return np.zeros((0, 0), np.float32), None
        return np.concatenate(feats), (np.concatenate(texture) if texture else None)

    def texture_statistics(self, images: np.ndarray) -> np.ndarray | None:
        """The OOD texture statistics of uint8 images (N, S, S); None for a graph without them."""
        return self.plain_outputs(images)[1]

    def ood_scores(self, images: np.ndarray, male: np.ndarray | None = None) -> np.ndarray:
        """The pooled density's score per preprocessed image (NaN without a density in the model file)."""
        if self.ood is None:
            return np.full(len(images), np.nan)
        return self.ood.score(self.plain_outputs(images)[0])

    # ---- one radiograph -----------------------------------------------------------------------------------
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
        rad, prepared, notes = self.prepare(image, name=name)
        given = parse_sex(sex, rad.source)
        header = rad.sex
        if given and header and given != header:
            notes.append(f"sex given as {given} but the DICOM header says {header}; using {given}")
        final = given or header
        if final is None:
            stated = (
                f"the file's PatientSex is {rad.sex_stated!r}, neither F nor M"
                if rad.sex_stated
                else "the file does not state it"
            )
            raise BoneAgeInputError(f"sex is required (female or male) and {stated}", rad.source)
        # a negative is judged first, so that everything after (views, checks, heatmap) sees the radiograph
        screen = self.polarity_check(oriented_pixels(rad))
        if screen.inverted is not None:
            prepared = self.preprocess(screen.inverted)
            notes.insert(
                0, POLARITY_CORRECTED_NOTE.format(ratio=screen.polarity, limit=POLARITY_CORRECT_LOG_RATIO)
            )
        mean, spread, views, feats, cams = self._run_arrays(
            prepared[None], np.array([final == "male"]), 16, self.views
        )
        input_score = float(self.ood.score(feats)[0]) if self.ood is not None else None
        ood_score = screen.pooled if screen.pooled is not None else input_score
        in_doubt = screen.polarity if polarity_verdict(screen.polarity) == "in doubt" else None
        self.check_distribution(prepared, ood_score, rad.source, screen.texture, polarity=in_doubt)
        # the orientation rule compares the input with its turned versions: all scored as the model sees them
        cautions = self.orientation_warnings(prepared, input_score, feats, frame=screen.copy)
        pred = Prediction(
            rad.source,
            final,
            float(mean[0]),
            float(spread[0]),
            [float(v) for v in views[0]],
            radiograph=rad,
            image=prepared,
            ood_score=ood_score,
            cam=None if cams is None else cams[0],
            inverted=screen.inverted is not None,
        )
        cautions += self.plausibility_warnings(pred)
        pred.cautions = cautions
        pred.warnings = [*cautions, *notes]
        return pred

    def heatmap(self, pred: Prediction) -> np.ndarray | None:
        """Grad-CAM over the last feature stage (float (S, S) in [0, 1]); None for a graph without one."""
        if pred.image is None:
            raise ValueError("prediction has no preprocessed image")
        if not self.has_heatmap:
            return None
        cam = pred.cam
        if cam is None:
            male = np.array([pred.sex == "male"])
            cam = self._run_arrays(pred.image[None], male, 1, self.views[:1])[4][0]
        return cam_to_heatmap(cam, pred.image.shape[-1])

    # ---- the refusal and warning rules -----------------------------------------------------------------
    def refusal_scores(
        self, pixels: np.ndarray, input_score: float | None = None
    ) -> tuple[float | None, float | None]:
        """(pooled, texture) density scores that the refusal rule judges, for a radiograph's pixels.

        Both densities were fitted on the training copies (squashed to 299 px, JPEG quality 60), and a
        clinic's full-resolution file scores higher than its own copy: 7 of the 1,001 held-out native PNGs
        were refused by the pooled density against 4 of their copies (v0.5). So, when the density's
        ``copy_recipe`` says the model was trained on such copies, the input is first remade the same way
        (``training_copy``) and both scores come from one plain pass over that copy. Otherwise both come
        from the model's own input (``input_score``: its pooled score, when already computed)."""
        if self.ood is None:
            return input_score, None
        size, quality = self.ood.copy_recipe
        texture = self.ood.texture
        if size <= 0 and input_score is not None and texture is None:
            return input_score, None
        (pooled,), (tex,), _ = self._copy_scores([pixels])
        return (input_score if size <= 0 and input_score is not None else pooled), tex

    def _copy_scores(
        self, images: list[np.ndarray]
    ) -> tuple[list[float], list[float | None], list[np.ndarray]]:
        """Pooled and texture density scores of radiographs' pixels, each remade as a training copy when the
        density's ``copy_recipe`` says so, from one plain pass; and the remade pixels. The one place the
        refusal scores are computed (``refusal_scores``, ``polarity_check``). Needs a density."""
        assert self.ood is not None
        size, quality = self.ood.copy_recipe
        remade = [training_copy(p, size, quality) if size > 0 else p for p in images]
        feats, stats = self.plain_outputs(np.stack([self.preprocess(p) for p in remade]))
        pooled = [float(v) for v in self.ood.score(feats)]
        texture = self.ood.texture
        if texture is None or stats is None or not stats.size:
            return pooled, [None] * len(images), remade
        return pooled, [float(v) for v in texture.score(stats)], remade

    def polarity_check(self, pixels: np.ndarray) -> Screen:
        """The refusal scores and the polarity of a radiograph's pixels (``boneage.ood.polarity``). The image
        and its inverse, each remade as ``refusal_scores`` remakes it, go through one plain pass together, so
        the check costs one image's pass; the scores and the copy are those of whichever is assessed."""
        if self.ood is None:
            return Screen()
        both = [pixels, 1.0 - np.asarray(pixels, dtype=np.float32)]
        pooled, tex, remade = self._copy_scores(both)
        ratio = polarity_log_ratio(pooled[0], pooled[1], tex[0], tex[1])
        k = 1 if polarity_verdict(ratio) == "inverted" else 0
        return Screen(pooled[k], tex[k], ratio, both[1] if k else None, remade[k])

    def orientation_warnings(
        self,
        prepared: np.ndarray,
        ood_score: float | None,
        features: np.ndarray,
        frame: np.ndarray | None = None,
    ) -> list[str]:
        """A hand turned by 90/180 degrees or upside down still looks like a hand to the density. Model files
        with an orientation probe (``boneage.ood.OrientationProbe``) ask it, from the features already
        computed, and confirm a doubt with the density of the turned image (``ORIENTATION_CONFIRM_RATIO``);
        older ones compare the density score with that of the image turned each way. A doubt no turn
        explains is confirmed from the ``frame`` (the radiograph as a training copy) instead: a hand cut off
        above the wrist or cut into pieces (``boneage.ood.frame``). A turn is not warned when the frame
        shows the forearm leaving by the bottom edge (``frame_upright``): then only the frame rules speak.
        A frame showing it leave by a side edge (``frame_sideways``) confirms a doubt instead of the density
        (a doubt as the cut-frame rules take it, ``WHOLE_HAND_UPRIGHT_LIMIT``): a hand turned by a quarter
        can still score better as given than turned back."""
        if self.ood is None or ood_score is None:
            return []
        probe = self.ood.orientation
        if probe is not None:
            upright = float(probe.upright_probability(features[:1])[0])
            side = frame_sideways(frame) if frame is not None and upright < WHOLE_HAND_UPRIGHT_LIMIT else None
            if side is not None:
                return [
                    "the hand looks rotated or upside down (the forearm leaves by a side edge: most likely "
                    f"{side}; upright probability {upright:.2f}): check the orientation, the bone age may be "
                    "wrong"
                ]
            if upright >= probe.limit:  # the common case: no extra forward passes
                return self._whole_hand_warnings(frame, upright)
        elif not np.isfinite(self.ood.rotation_ratio):
            return self._whole_hand_warnings(frame, None)
        others = self.ood_scores(turned(prepared[None]))
        ratio = rotation_ratios(np.array([ood_score]), others)
        if not self.ood.looks_turned(features[:1], ratio)[0] or (frame is not None and frame_upright(frame)):
            return self._whole_hand_warnings(frame, upright if probe is not None else None)
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

    @staticmethod
    def _whole_hand_warnings(frame: np.ndarray | None, upright: float | None) -> list[str]:
        """No turn explains the image: warn when its frame shows the hand cut off or in pieces (issue #43
        item 5: a wrist-only crop, a shuffled image), as ``boneage.ood.frame`` judges with the probe's
        ``upright`` probability (None: no probe)."""
        reasons = cut_reasons(frame, upright) if frame is not None else []
        if not reasons:
            return []
        doubt = f"; upright probability {upright:.2f}" if upright is not None else ""
        return [
            "the image does not look like a whole left hand in one piece ("
            + "; ".join(reasons)
            + f"{doubt}): check the image, the bone age may be wrong"
        ]

    def check_distribution(
        self,
        prepared: np.ndarray,
        ood_score: float | None,
        source: object,
        texture_score: float | None = None,
        *,
        polarity: float | None = None,
    ) -> None:
        """Refuse an input that is not a hand radiograph like the training ones: a bone age for it would
        look confident and normal and mean nothing (see ``boneage.ood``). ``polarity``: the log ratio of an
        image whose polarity is in doubt (``boneage.ood.polarity``), which is refused too."""
        reasons = image_checks(prepared)
        if polarity is not None:
            reasons.append(
                "it may be a negative (bone dark, air bright): it looks about as much like the training "
                f"radiographs inverted as it does as given (polarity evidence {polarity:.1f}; refused "
                f"between {POLARITY_DOUBT_LOG_RATIO:.1f} and {POLARITY_CORRECT_LOG_RATIO:.1f}, inverted back "
                "above)"
            )
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
        limit = self.facts.tta_spread_p99_months or DEFAULT_SPREAD_LIMIT_MONTHS
        if pred.uncertainty_months > limit:
            out.append(
                f"the prediction is unstable across test-time views (±{pred.uncertainty_months:.1f} months, "
                f"more than {limit:.1f} seen on 99% of training radiographs): is this a left-hand radiograph?"
            )
        if not math.isfinite(pred.bone_age_months):
            out.append("the model returned no finite prediction")
        return out

    # ---- what the model states -----------------------------------------------------------------------------
    @property
    def info(self) -> dict[str, Any]:
        """The model's facts for reports and the API (no file paths): version, backbone, input size, the
        headline accuracy, and everything its file states."""
        return {
            "model_version": self.facts.model_version,
            "backbone": self.spec.backbone,
            "input_size": self.spec.preprocess.size,
            "engine": self.engine.name,
            "headline": self.facts.headline(),
            **{k: v for k, v in self.facts.public().items() if k not in {"model_version", "facts_version"}},
        }

    @property
    def training_range(self) -> tuple[float, float] | None:
        """The bone ages (months) the model was trained on, as its file records them."""
        rng = self.facts.training_range_months
        return (float(rng[0]), float(rng[1])) if rng is not None else None
