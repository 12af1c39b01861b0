"""Is this a hand radiograph of the kind the model saw? Densities of the network's own features, the
orientation probe, and how they are fitted from feature arrays (numpy; fitting the probe needs sklearn)."""

from boneage.ood.density import (
    ORIENTATION_CLASSES,
    ORIENTATION_CONFIRM_RATIO,
    ORIENTATIONS,
    PREFIX,
    TEXTURE_COMPONENTS,
    TEXTURE_PREFIX,
    TEXTURE_STAGE,
    FeatureDensity,
    OrientationProbe,
    image_checks,
    rotation_ratios,
    turned,
)

__all__ = [
    "ORIENTATIONS",
    "ORIENTATION_CLASSES",
    "ORIENTATION_CONFIRM_RATIO",
    "PREFIX",
    "TEXTURE_COMPONENTS",
    "TEXTURE_PREFIX",
    "TEXTURE_STAGE",
    "FeatureDensity",
    "OrientationProbe",
    "image_checks",
    "rotation_ratios",
    "turned",
]
