"""One factory: a model file and an engine name → a ``Predictor``.

``onnx`` runs the graph beside a bundle on ONNX Runtime (no torch; a checkpoint, or a bundle whose graph is
missing or stale, is exported first when the training stack is installed). ``torch`` runs the same graph in
torch. The default is ``onnx`` when onnxruntime is installed, else ``torch``.
"""

from __future__ import annotations

from pathlib import Path

from boneage.errors import BoneAgeInputError
from boneage.modelfile import ModelFile
from boneage.predict.onnx_engine import OnnxEngine, current_graph_session, onnx_available
from boneage.predict.predictor import Predictor

ENGINES = ("onnx", "torch")
TRAIN_EXTRA = "pip install 'boneage[train]'"


def default_engine() -> str:
    return "onnx" if onnx_available() else "torch"


def load_predictor(
    path: str | Path | None = None,
    *,
    engine: str | None = None,
    tta: bool = True,
    threads: int | None = None,
    device: str = "auto",
) -> Predictor:
    """The model file at ``path`` (None: the bundled model) behind ``engine``: ``onnx``, ``torch`` or None
    (onnx when onnxruntime is installed). ``threads`` caps ONNX Runtime's threads; ``device`` is the torch
    engine's (``auto``: a GPU when there is one)."""
    chosen = default_engine() if engine in (None, "", "auto") else engine
    if chosen not in ENGINES:
        raise BoneAgeInputError(f"unknown engine {engine!r} (onnx or torch)")
    model_file = ModelFile.read(path)
    if chosen == "onnx":
        if not onnx_available():
            raise BoneAgeInputError(
                "onnxruntime is not installed (pip install onnxruntime, or --engine torch)"
            )
        session = None
        if model_file.kind == "bundle":
            session = current_graph_session(model_file.onnx_path, model_file.path, threads)
        if session is None:
            why = (
                "a training checkpoint"
                if model_file.kind == "checkpoint"
                else (f"no up-to-date {model_file.onnx_path.name} beside this model file")
            )
            session = OnnxEngine.open(_export_with_torch(model_file.path, why), threads).session
        engine_impl: object = OnnxEngine(session)
    else:
        try:
            from boneage.models.net import network_from_file
            from boneage.predict.torch_engine import TorchEngine
        except ImportError:
            raise BoneAgeInputError(
                f"the torch engine needs the training stack ({TRAIN_EXTRA}); or install onnxruntime"
            ) from None
        engine_impl = TorchEngine(network_from_file(model_file), device)
    return Predictor(
        engine_impl,  # type: ignore[arg-type]
        model_file.spec,
        model_file.facts,
        model_file.density,
        tta=tta,
        source=model_file.path,
    )


def _export_with_torch(path: Path, what: str) -> Path:
    """Export the ONNX graph of ``path`` with the training stack, or say in one line how to get one."""
    try:
        from boneage.models.export import cached_onnx_export
    except ImportError:
        raise BoneAgeInputError(
            f"{what}: the ONNX graph must be exported with the training stack ({TRAIN_EXTRA}), e.g. "
            f"`boneage export --checkpoint {path} --out {path.with_suffix('.onnx')}`",
            path,
        ) from None
    return cached_onnx_export(path)
