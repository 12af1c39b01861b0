"""The ONNX engine: the model file's exported graph on ONNX Runtime. No torch, one session shared by every
thread (the heatmap is computed inside the graph, so nothing hooks the network while it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from boneage.modelfile import stamp_is_current


class OnnxEngine:
    name = "onnx"
    thread_safe = True

    def __init__(self, session: Any) -> None:
        self.session = session
        self.outputs: tuple[str, ...] = tuple(o.name for o in session.get_outputs())

    @classmethod
    def open(cls, graph: str | Path, threads: int | None = None) -> OnnxEngine:
        return cls(onnx_session(graph, threads))

    def run(self, images: np.ndarray, male: np.ndarray) -> dict[str, np.ndarray]:
        feed = {"image": np.ascontiguousarray(images, dtype=np.float32), "male": male.astype(np.float32)}
        return dict(zip(self.outputs, self.session.run(None, feed), strict=True))


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


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


def current_graph_session(graph: Path, weights: Path, threads: int | None) -> Any | None:
    """A session on ``graph`` when it was exported (by this export version) from ``weights``' bytes; None
    when it is missing, unreadable or stale."""
    if not graph.is_file():
        return None
    try:
        session = onnx_session(graph, threads)
    except Exception:  # onnxruntime raises its own exception types for a damaged file
        return None
    if not stamp_is_current(dict(session.get_modelmeta().custom_metadata_map), weights):
        return None
    return session
