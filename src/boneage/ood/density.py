"""Is this a PA hand radiograph of the kind the model was trained on? A density model of the network's own
pooled features, fitted on training radiographs when a model is bundled and shipped inside the bundle.

The method is the standard one for a trained network without extra labelled data (Lee et al., NeurIPS 2018,
"A simple unified framework for detecting out-of-distribution samples"): the Mahalanobis distance of an
image's penultimate features from the training features, here in the leading principal components, plus
the squared residual outside them (what PCA cannot explain is itself unusual). The score is scaled so that
training images average about 1; the refusal threshold is a high quantile of the scores of the run's
validation split (training ids, never the held-out ones), so the false-refusal rate on real hands is known
before the model ships. A noise image, a chest film or a rotated hand lands far outside that cloud, where
the regression head would still print a confident, normal-looking bone age.

Pooled features of a regression network are blind to some of what makes an image a radiograph: v0.3's
placed two synthetic chest-like drawings inside the real-hand cloud. Lee et al.'s remedy is densities on
earlier layers too; here a second density (``texture``) of the per-channel mean and standard deviation of
an early stage's activations. That texture depends on how an image was made: a clinic's PNG, downsampled
from ~1,000 px, scored about twice as high as the 299 px JPEG copies of the same hands, and 8% of real
native files were refused when the statistics were taken from the model's own input. So the texture check
first remakes the input the way the training copies were made (``boneage.preprocess.training_copy``:
squash to 299 px, JPEG quality 60), which brought the native files' scores onto their copies' (median
0.77 vs 0.74 on v0.3; docs/research-log.md). The pooled density has the same bias
in a milder form (v0.5: 7 of the 1,001 held-out native PNGs past its limit against 4 of their copies), so
its refusal score is taken from the same remade copy, in the same plain pass that gives the texture
statistics (``Predictor.refusal_scores``). The orientation check still compares the model's own input
with its turned versions, as it was calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PREFIX = "ood."  # tensor names inside a bundle
TEXTURE_PREFIX = "ood.texture."  # the texture density's tensors
# The texture statistics: per-channel mean and standard deviation of this EfficientNet stage's output
# (timm ``blocks[1]``, stride 4; a model file records its own stage, ``OodFacts.texture_stage``). v0.4 to
# v0.12.0 as first bundled tapped ``blocks[2]`` (v0.3's setting). Re-chosen on 2026-12-07 (issue #43 item 5),
# with v0.12.0's weights, each stage's density fitted and calibrated by the shipped rule on training ids: the
# stage whose limit the synthetic non-hand drawings (skull, chest, forearm, blobs of
# ``benchmarks/ood_battery.py``) pass by the widest worst-case margin. Score / limit of the hardest, the
# skull-like ring: stage 0 0.60, 1 1.57, 2 1.14, 3 1.07, 4 1.01, 5 0.87, 6 0.72 (docs/research-log.md).
TEXTURE_STAGE = 1
TEXTURE_COMPONENTS = 32


@dataclass
class FeatureDensity:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    residual_scale: float  # mean squared residual of the training features
    threshold: float = float("inf")  # scores above it: not a hand radiograph like the training ones
    # score(image) / min score(image turned): above it the hand is probably rotated or upside down
    rotation_ratio: float = float("inf")
    orientation: OrientationProbe | None = None  # the orientation classifier (newer bundles)
    # a second density, of early-layer texture statistics (``TEXTURE_STAGE``) of the image remade as a
    # training copy (``training_copy_of``): what the pooled features are blind to (newer bundles)
    texture: FeatureDensity | None = None
    # (squash size, JPEG quality) the texture check remakes an input with before its statistics; (0, 0):
    # none (a model not trained on the shared 299 px JPEG copies)
    copy_recipe: tuple[int, int] = (299, 60)

    @classmethod
    def fit(cls, features: np.ndarray, components: int = 64) -> FeatureDensity:
        """PCA of the training features; ``components`` is capped by the number of images."""
        x = np.asarray(features, dtype=np.float64)
        mean = x.mean(0)
        centred = x - mean
        k = int(min(components, len(x) - 1, x.shape[1]))
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        comps = vt[:k]
        variances = np.maximum((s[:k] ** 2) / max(1, len(x) - 1), 1e-12)
        resid = centred - (centred @ comps.T) @ comps
        residual_scale = max(float(np.mean(np.sum(resid**2, 1))), 1e-12)
        model = cls(mean, comps, variances, residual_scale)
        model._k = k
        return model

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance from the training cloud: about 1 for a typical training image, larger further out."""
        x = np.asarray(features, dtype=np.float64) - self.mean
        z = x @ self.components.T
        maha = np.sum(z**2 / self.variances, 1)
        resid = np.sum((x - z @ self.components) ** 2, 1) / self.residual_scale
        k = len(self.variances)
        return (maha + resid) / (k + 1)

    def calibrate(self, features: np.ndarray, quantile: float = 0.995, margin: float = 1.25) -> float:
        """Set the threshold to ``margin`` x the ``quantile`` of real hands' scores (validation split)."""
        self.threshold = float(np.quantile(self.score(features), quantile) * margin)
        return self.threshold

    def refuses(self, scores: np.ndarray | float) -> np.ndarray:
        """Which scores are past the threshold: the one place the refusal rule lives, so that prediction,
        bundling facts and the OOD battery cannot drift apart."""
        return np.asarray(scores, dtype=np.float64) > self.threshold

    def to_tensors(self, prefix: str = PREFIX) -> dict[str, np.ndarray]:
        out = {
            f"{prefix}mean": self.mean.astype(np.float32),
            f"{prefix}components": self.components.astype(np.float32),
            f"{prefix}variances": self.variances.astype(np.float32),
            f"{prefix}residual_scale": np.array([self.residual_scale], dtype=np.float32),
            f"{prefix}threshold": np.array([self.threshold], dtype=np.float32),
            f"{prefix}rotation_ratio": np.array([self.rotation_ratio], dtype=np.float32),
            **(self.orientation.to_tensors() if self.orientation is not None else {}),
        }
        if self.texture is not None:
            out.update(self.texture.to_tensors(TEXTURE_PREFIX))
            out[f"{TEXTURE_PREFIX}copy_recipe"] = np.array(self.copy_recipe, dtype=np.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], prefix: str = PREFIX) -> FeatureDensity | None:
        """The density a bundle ships, or None for a bundle made without one (v0.1, tiny test models)."""
        names = ("mean", "components", "variances", "residual_scale", "threshold")
        if not all(f"{prefix}{n}" in tensors for n in names):
            return None
        t = {n: np.asarray(tensors[f"{prefix}{n}"], dtype=np.float64) for n in names}
        scale, threshold = float(t["residual_scale"][0]), float(t["threshold"][0])
        ratio = tensors.get(f"{prefix}rotation_ratio")  # absent in bundles made before the check
        rotation = float(np.asarray(ratio).reshape(-1)[0]) if ratio is not None else float("inf")
        if prefix != PREFIX:  # a nested (texture) density: no probe, no density of its own inside
            return cls(t["mean"], t["components"], t["variances"], scale, threshold, rotation)
        orientation = OrientationProbe.from_tensors(tensors)
        density = cls(t["mean"], t["components"], t["variances"], scale, threshold, rotation, orientation)
        density.texture = cls.from_tensors(tensors, TEXTURE_PREFIX)
        recipe = tensors.get(f"{TEXTURE_PREFIX}copy_recipe")
        if recipe is not None:
            size, quality = (int(round(float(v))) for v in np.asarray(recipe).reshape(-1)[:2])
            density.copy_recipe = (size, quality)
        return density

    def looks_turned(self, features: np.ndarray, ratios: np.ndarray) -> np.ndarray:
        """The orientation rule ``predict`` applies, per image: with a probe, it doubts the image and the
        density confirms (``ORIENTATION_CONFIRM_RATIO``); without one (older bundles), the ratio alone.
        ``ratios`` as ``rotation_ratios`` gives them (or a lower bound of them)."""
        ratios = np.asarray(ratios, dtype=np.float64)
        if self.orientation is None:
            return ratios > self.rotation_ratio
        doubt = self.orientation.upright_probability(features) < self.orientation.limit
        return doubt & (ratios > ORIENTATION_CONFIRM_RATIO)


# An upright PA hand scores lowest as it is; a hand turned by 90/180/270 degrees or upside down has an
# orientation (the one that undoes the turn) that scores much lower than the image as given. A rotated hand
# stays hand-like enough to pass the density threshold, so the ratio is checked separately.
ORIENTATIONS = {
    "turned 90 degrees": lambda a: np.rot90(a, 1, axes=(-2, -1)),
    "turned 180 degrees": lambda a: np.rot90(a, 2, axes=(-2, -1)),
    "turned 270 degrees": lambda a: np.rot90(a, 3, axes=(-2, -1)),
    "upside down": lambda a: a[..., ::-1, :],
}


def turned(images: np.ndarray) -> np.ndarray:
    """(N, S, S) → (4N, S, S): every image in every other orientation, orientation-major."""
    return np.ascontiguousarray(np.concatenate([f(images) for f in ORIENTATIONS.values()]))


def rotation_ratios(scores: np.ndarray, turned_scores: np.ndarray) -> np.ndarray:
    """score as given / the lowest score over the other orientations (``turned_scores`` from ``turned``)."""
    best = np.asarray(turned_scores, dtype=np.float64).reshape(len(ORIENTATIONS), -1).min(0)
    return np.asarray(scores, dtype=np.float64) / np.maximum(best, 1e-9)


def image_checks(image: np.ndarray) -> list[str]:
    """Cheap statistics of the preprocessed uint8 image that no hand radiograph fails: reasons, or []."""
    img = np.asarray(image, dtype=np.float32)
    return ["the image is almost uniform"] if img.std() < 8 else []


ORIENTATION_CLASSES = ("upright", *ORIENTATIONS)
# The probe alone flagged 15 of the 1,001 held-out native PNGs (v0.3), all upright hands on inspection
# (one tilted about 30 degrees); it was fitted on the 299 px copies. A warning therefore needs a second,
# independent signal: some turned version of the image must also look more like the training radiographs
# to the density than the image as given (ratio above 1). Upright hands rarely pass that; a turned hand
# almost always does, and the four extra forward passes run only for images the probe doubts.
ORIENTATION_CONFIRM_RATIO = 1.0


@dataclass
class OrientationProbe:
    """Which way up is this hand? A linear softmax classifier on the same pooled features, trained on
    training radiographs shown upright and turned each way (labels that cost nothing: the self-supervised
    rotation task of Gidaris et al., ICLR 2018). One matrix product on features ``predict`` already has, so
    the ratio test's four extra forward passes run only for the images it doubts."""

    weight: np.ndarray  # (len(ORIENTATION_CLASSES), D), acting on raw features (the scaler folded in)
    bias: np.ndarray  # (len(ORIENTATION_CLASSES),)
    # warn when P(upright) is below it. Chosen on 400 training ids outside a prototype probe's fit (v0.2
    # features): 0.3 flagged 1 of the 400 upright and missed 2 of their 1,600 turned copies; 0.5 flagged 2
    # and missed 1; 0.1 flagged 1 and missed 37. RSNA's training set itself holds a few turned hands.
    limit: float = 0.3

    @classmethod
    def fit(cls, upright: np.ndarray, turned_features: np.ndarray, c: float = 0.005) -> OrientationProbe:
        """``upright`` (N, D) and ``turned_features`` (4N, D) as ``turned`` orders the images. Needs
        scikit-learn (the training extra); the fitted probe is plain numpy."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x = np.concatenate([upright, turned_features]).astype(np.float64)
        y = np.repeat(np.arange(len(ORIENTATION_CLASSES)), len(upright))
        if len(x) != len(y):
            raise ValueError("turned_features must hold every image in each of the four other orientations")
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x), y)
        weight = clf.coef_ / scaler.scale_
        bias = clf.intercept_ - weight @ scaler.mean_
        return cls(weight, bias)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """(N, 5) softmax over ORIENTATION_CLASSES."""
        logits = np.asarray(features, dtype=np.float64) @ self.weight.T + self.bias
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    def upright_probability(self, features: np.ndarray) -> np.ndarray:
        return self.probabilities(features)[:, 0]

    def likely_turn(self, features: np.ndarray) -> list[str]:
        """The most likely of the four turns for each image (what a warning names)."""
        p = self.probabilities(features)[:, 1:]
        return [ORIENTATION_CLASSES[1 + int(i)] for i in p.argmax(1)]

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {
            f"{PREFIX}orientation_weight": self.weight.astype(np.float32),
            f"{PREFIX}orientation_bias": self.bias.astype(np.float32),
            f"{PREFIX}orientation_limit": np.array([self.limit], dtype=np.float32),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray]) -> OrientationProbe | None:
        names = ("weight", "bias", "limit")
        if not all(f"{PREFIX}orientation_{n}" in tensors for n in names):
            return None
        t = {n: np.asarray(tensors[f"{PREFIX}orientation_{n}"], dtype=np.float64) for n in names}
        return cls(t["weight"], t["bias"], float(t["limit"].reshape(-1)[0]))
