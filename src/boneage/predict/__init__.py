"""From a radiograph to a bone age: the clinical policy every engine shares (``predictor``), the test-time
views and heatmap maths (``views``), the ONNX engine (``onnx_engine``, no torch), the torch engine
(``torch_engine``) and one factory (``load_predictor``). Importing this package never imports torch."""

from boneage.predict.factory import ENGINES, default_engine, load_predictor
from boneage.predict.predictor import Engine, Prediction, Predictor, oriented_pixels
from boneage.predict.views import TTA_VIEWS

# ``Predictor.load(path)``, as 0.12 spelled it: the factory
Predictor.load = staticmethod(load_predictor)  # type: ignore[attr-defined]

__all__ = [
    "ENGINES",
    "TTA_VIEWS",
    "Engine",
    "Prediction",
    "Predictor",
    "default_engine",
    "load_predictor",
    "oriented_pixels",
]
