"""boneage: pediatric bone age assessment from left-hand radiographs."""

from boneage import _compat
from boneage.errors import BoneAgeInputError

__version__ = "0.13.0"
__all__ = ["BoneAgeInputError", "__version__"]

_compat.install()  # 0.12 module paths, deprecated
