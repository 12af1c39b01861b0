"""The shipped model's file format: one reader (``ModelFile.read``), one writer (``write_model_file``), and
the typed facts a model states about itself (``ModelFacts``). Needs numpy only, never torch, for bundles."""

from boneage.modelfile.facts import FACTS_VERSION, LICENCE, Measured, ModelFacts, OodFacts
from boneage.modelfile.format import (
    AVERAGE_RECORDS,
    BUNDLED_NAME,
    ModelFile,
    bundled_model_path,
    file_digest,
    onnx_path_for,
    onnx_stamp,
    read_weights,
    stamp_is_current,
    write_model_file,
)

__all__ = [
    "AVERAGE_RECORDS",
    "BUNDLED_NAME",
    "FACTS_VERSION",
    "LICENCE",
    "Measured",
    "ModelFacts",
    "ModelFile",
    "OodFacts",
    "bundled_model_path",
    "file_digest",
    "onnx_path_for",
    "onnx_stamp",
    "read_weights",
    "stamp_is_current",
    "write_model_file",
]
