"""The network a ``ModelSpec`` describes (``net``), where its first weights come from (``init``), what is
done to trained weights (``surgery``) and the network as an ONNX graph with its heatmap inside (``export``).
Needs torch: the light install never imports this package."""

from boneage.models.init import build_model
from boneage.models.net import BoneAgeNet, network_from_file
from boneage.models.surgery import average_state_dicts, freeze_all_but, reestimate_batchnorm

__all__ = [
    "BoneAgeNet",
    "average_state_dicts",
    "build_model",
    "freeze_all_but",
    "network_from_file",
    "reestimate_batchnorm",
]
