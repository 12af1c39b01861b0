"""The one reader and writer of model files: a shipped bundle (``.safetensors``) or a training checkpoint
(``.ckpt``), in today's layout or an older one.

A bundle is two files side by side: ``model.safetensors`` (the ``ModelSpec``, the ``ModelFacts``, the OOD
densities and fp16 weights) and ``model.onnx`` (the same weights as a graph, exported by
``boneage.models.export`` and stamped here with the digest of the weights it came from, so a stale graph is
never run). Reading a bundle needs numpy only: the light install never imports torch. Older layouts are
converted on read: v0.1 files carried the whole training config instead of a spec, and named the head's
layers by index; v0.1–v0.12.0 files kept their facts as one flat dict.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import ValidationError

from boneage.errors import BoneAgeInputError
from boneage.files import atomic_path
from boneage.modelfile.facts import ModelFacts
from boneage.ood import PREFIX as OOD_PREFIX
from boneage.ood import FeatureDensity
from boneage.spec import ModelSpec, PreprocessSpec, one_line

if TYPE_CHECKING:
    import torch

BUNDLED_NAME = "model.safetensors"
METADATA_KEY = "boneage"
#: bumped when the exported graph changes (inputs, outputs, heatmap maths): older graphs are re-exported
ONNX_EXPORT_VERSION = "4"
ONNX_META_DIGEST = "boneage_weights_sha256"
ONNX_META_VERSION = "boneage_export_version"
TARGET_BUFFERS = ("age_mean", "age_std")  # a model's training-target statistics, stored with its weights
# kept at full precision in a bundle: the targets' and pixels' statistics are not weights
_FULL_PRECISION = ("age_", "pixel_")


def bundled_model_path() -> Path:
    return Path(str(resources.files("boneage") / "assets" / BUNDLED_NAME))


def onnx_path_for(weights: str | Path) -> Path:
    """The ONNX graph that ships beside a bundle: ``model.safetensors`` → ``model.onnx``."""
    return Path(weights).with_suffix(".onnx")


def file_digest(path: str | Path) -> str:
    """sha256 of a weights file: ties an exported graph to the exact weights it came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def onnx_stamp(weights: str | Path) -> dict[str, str]:
    """The metadata an exported graph carries: which weights, which export version."""
    return {ONNX_META_DIGEST: file_digest(weights), ONNX_META_VERSION: ONNX_EXPORT_VERSION}


def stamp_is_current(graph_metadata: dict[str, str], weights: str | Path) -> bool:
    """Whether a graph with this metadata was exported, by this export version, from these bytes."""
    if graph_metadata.get(ONNX_META_VERSION) != ONNX_EXPORT_VERSION:
        return False
    return graph_metadata.get(ONNX_META_DIGEST) == file_digest(weights)


@dataclass
class ModelFile:
    """A model file, read: what the model is (``spec``), what it states (``facts``), its OOD densities, and
    (on request, with torch) its network weights."""

    path: Path
    kind: Literal["bundle", "checkpoint"]
    spec: ModelSpec
    facts: ModelFacts
    density: FeatureDensity | None = None
    # a v0.1 checkpoint's whole training config (later runs keep theirs in the run folder's config.yaml)
    training_config: dict[str, Any] | None = None
    _state: dict[str, Any] | None = field(default=None, repr=False)  # a checkpoint's tensors, loaded once

    @classmethod
    def read(cls, path: str | Path | None = None) -> ModelFile:
        """``path`` None → the bundled model. Problems are one line naming the file."""
        p = Path(path).expanduser() if path is not None else bundled_model_path()
        if not p.is_file():
            if path is None:
                raise BoneAgeInputError("no bundled model in this installation; pass --checkpoint FILE")
            what = "is a folder, not a model file" if p.is_dir() else "model file not found"
            raise BoneAgeInputError(what, p)
        if p.suffix == ".safetensors":
            return _read_bundle(p)
        if p.suffix == ".onnx":
            raise BoneAgeInputError(
                "an .onnx graph alone is not a model file: pass the .safetensors beside it", p
            )
        return _read_checkpoint(p)

    @property
    def onnx_path(self) -> Path:
        return onnx_path_for(self.path)

    def network_state(self) -> dict[str, torch.Tensor]:
        """The network's tensors in float32 (head layers in today's names, no OOD tensors); needs torch."""
        if self._state is None:
            return read_weights(self.path)
        return {k: v for k, v in rename_legacy_head(self._state).items() if not k.startswith(OOD_PREFIX)}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The network tensors of a model file, a Lightning checkpoint or a plain state dict (another tool's
    weights, to initialise from): float32 where floating, head layers in today's names, no OOD tensors.
    Needs no spec, so it reads what ``ModelFile.read`` would refuse; needs torch."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BoneAgeInputError("model file not found", p)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(p)).items()}
        else:
            import torch

            raw = checkpoint_state(torch.load(p, map_location="cpu", weights_only=False))
    except BoneAgeInputError:
        raise
    except Exception as exc:  # a damaged or foreign file
        raise BoneAgeInputError(f"not a readable weights file ({type(exc).__name__})", p) from None
    return {k: v for k, v in rename_legacy_head(raw).items() if not k.startswith(OOD_PREFIX)}


def _read_bundle(p: Path) -> ModelFile:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
            wanted = [k for k in f.keys() if k.startswith(OOD_PREFIX) or k in TARGET_BUFFERS]
            small = {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in wanted}
    except Exception as exc:  # safetensors raises its own types for a damaged or foreign file
        raise BoneAgeInputError(f"not a readable safetensors file ({type(exc).__name__})", p) from None
    if not isinstance(meta, dict) or not ({"spec", "config"} & set(meta)):
        raise BoneAgeInputError("safetensors file has no boneage metadata (not made by boneage?)", p)
    targets = {k: float(v.reshape(-1)[0]) for k, v in small.items() if k in TARGET_BUFFERS}
    density = FeatureDensity.from_tensors({k: v for k, v in small.items() if k.startswith(OOD_PREFIX)})
    return ModelFile(
        p, "bundle", spec_from_record(meta, targets, p), ModelFacts.from_record(meta, p), density
    )


# what a weight average records of itself in its checkpoint (``boneage.release.average``)
AVERAGE_RECORDS = ("averaged_from", "batchnorm")


def _read_checkpoint(p: Path) -> ModelFile:
    try:
        import torch
    except ImportError:
        raise BoneAgeInputError(
            "a training checkpoint needs the training stack (pip install 'boneage[train]'); a bundle "
            "(.safetensors) does not",
            p,
        ) from None
    try:
        blob = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise BoneAgeInputError(f"not a readable checkpoint ({type(exc).__name__})", p) from None
    if not isinstance(blob, dict):
        raise BoneAgeInputError("not a boneage checkpoint", p)
    state = checkpoint_state(blob)
    hp = blob.get("hyper_parameters") or {}
    record = {"spec": blob["boneage_spec"]} if "boneage_spec" in blob else hp
    if not ({"spec", "config"} & set(record)):
        raise BoneAgeInputError("checkpoint has no boneage model spec (not from boneage train?)", p)
    targets = {k: float(state[k]) for k in TARGET_BUFFERS if k in state}
    spec = spec_from_record(record, targets, p)
    if "spec" in record and "boneage_spec" not in blob and len(targets) == 2:
        # hyper-parameters hold the spec as it was before fitting; the buffers hold the fitted targets
        spec.target_mean, spec.target_std = targets["age_mean"], targets["age_std"]
    facts = ModelFacts(source_checkpoint=p.name, **{k: blob[k] for k in AVERAGE_RECORDS if k in blob})
    density = FeatureDensity.from_tensors(
        {k: v.numpy() for k, v in state.items() if k.startswith(OOD_PREFIX)}
    )
    config = hp.get("config") if isinstance(hp.get("config"), dict) else None
    return ModelFile(p, "checkpoint", spec, facts, density, config, state)


def checkpoint_state(blob: Any) -> dict[str, Any]:
    """The network's tensors inside an already-loaded checkpoint (Lightning's ``model.`` prefix removed)."""
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    prefix = "model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return rename_legacy_head(state)


def rename_legacy_head(state: dict[str, Any]) -> dict[str, Any]:
    """v0.1 heads were one ``nn.Sequential`` whose indices moved with dropout (``head.0``, ``head.3``):
    their Linear layers, in order, become ``head.hidden.<i>`` and the last one ``head.out``."""
    import re

    pattern = re.compile(r"^head\.(\d+)\.(weight|bias)$")
    indices = sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})
    if not indices:
        return state
    names = {i: f"hidden.{n}" for n, i in enumerate(indices[:-1])} | {indices[-1]: "out"}
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        out[f"head.{names[int(m.group(1))]}.{m.group(2)}" if m else key] = value
    return out


def spec_from_record(
    record: dict[str, Any], targets: dict[str, float] | None = None, source: object = None
) -> ModelSpec:
    """A spec from a checkpoint's hyper-parameters or a bundle's metadata, in either layout."""
    if "spec" in record:
        return ModelSpec.parse(record["spec"], source)
    try:  # v0.1: the whole training config; only its preprocess and model sections describe the model
        config = record["config"]
        pre = {k: v for k, v in (config.get("preprocess") or {}).items() if k in PreprocessSpec.model_fields}
        m = config.get("model") or {}
        fields = {k: m[k] for k in ("backbone", "in_chans", "sex_units", "head", "dropout", "task") if k in m}
        spec = ModelSpec(preprocess=PreprocessSpec(**pre), **fields)
    except ValidationError as exc:
        raise BoneAgeInputError(
            f"cannot convert this v0.1 model ({one_line(exc)}); rewrite it with "
            "`boneage bundle --convert OLD --out NEW`",
            source,
        ) from None
    for name, buffer in (("target_mean", "age_mean"), ("target_std", "age_std")):
        if targets and buffer in targets:
            setattr(spec, name, float(targets[buffer]))
    return spec


def write_model_file(
    path: str | Path,
    spec: ModelSpec,
    facts: ModelFacts,
    state: dict[str, torch.Tensor],
    density: FeatureDensity | None = None,
) -> Path:
    """fp16 safetensors with the spec and facts in its metadata and the OOD densities (fp32) beside the
    weights; written to a temporary file and renamed, so a reader never sees half a model. The ONNX graph
    beside it is ``boneage.models.export.export_model_file_onnx``'s job."""
    import torch
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.half() if v.is_floating_point() and not k.startswith(_FULL_PRECISION) else v).contiguous()
        for k, v in state.items()
        if not k.startswith(OOD_PREFIX)
    }
    if density is not None:
        tensors.update({k: torch.from_numpy(v).contiguous() for k, v in density.to_tensors().items()})
    meta = {"spec": spec.model_dump(mode="json"), "facts": facts.model_dump(mode="json", exclude_none=True)}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    return out
