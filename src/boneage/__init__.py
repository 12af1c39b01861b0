"""boneage: pediatric bone age assessment from left-hand radiographs."""

from boneage.errors import BoneAgeInputError

__version__ = "0.12.0"
__all__ = ["BoneAgeInputError", "__version__"]
