"""The torch engine: the same graph as the ONNX engine (``boneage.models.export.ExportGraph``), run by
torch on the CPU or a GPU. For research (any timm backbone, a GPU) and for checking the ONNX engine."""

from __future__ import annotations

import numpy as np
import torch

from boneage.models.export import ExportGraph, cam_supported
from boneage.models.net import BoneAgeNet


class TorchEngine:
    name = "torch"
    thread_safe = True  # inference mode, no hooks, no state between calls

    def __init__(self, model: BoneAgeNet, device: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # float32 once here: a model handed over in bf16/fp16 (e.g. from a mixed-precision trainer) would
        # otherwise need casting on every call
        self.model = model.float().eval().to(self.device)
        self.graph = ExportGraph(self.model, cam_supported(self.model)).eval()
        self.outputs: tuple[str, ...] = self.graph.output_names

    def run(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        s = torch.from_numpy(np.ascontiguousarray(male, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            out = self.graph(x, s)
        return {name: t.float().cpu().numpy() for name, t in zip(self.outputs, out, strict=True)}
