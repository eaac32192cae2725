"""Adapters on disk, in the files researchers know from HF peft.

    adapter_model.safetensors   the LiME tensors (trainable ones, and LoRA-FA's frozen A / the prompt base)
    adapter_config.json         "peft_type": "LIME", every hyperparameter, the base model's name, the wrapped modules,
                                and "tensors": the dtype, shape and sha256 of every tensor in the weights file

Writes are atomic (a temporary directory renamed into place), loads never unpickle. A load checks everything
before it touches the model (config, wrapped modules, tensor names, dtypes, shapes, checksums, finite values)
against a weightless meta-device copy of the model, so a refused load leaves the model exactly as it was.
Adapters saved before checksums were recorded still load, with a warning, under every check but the checksum.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lime.config import LiMEConfig
from lime.inject import apply_lime, lime_modules
from lime.mocle import read_clusters, save_clusters

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LIME"
MANIFEST_KEY = "tensors"  # in adapter_config.json: {tensor name: {"dtype", "shape", "sha256"}}


class AdapterError(ValueError):
    """An adapter directory cannot be loaded onto this model; the message says why."""


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block completes.

    A crash (or SIGKILL) while writing leaves the previous `path` untouched; only the rename is exposed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors LiME added to `model`, by their full dotted names (the frozen base layers excluded)."""
    state = {}
    for name, module in lime_modules(model):
        for key, tensor in module.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = tensor
    return state


def base_model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or ""


# safetensors' names of the dtypes an adapter holds (its header says e.g. "F32").
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def tensor_sha256(tensor: Tensor) -> str:
    """sha256 of the tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def tensor_manifest(state: dict[str, Tensor]) -> dict[str, dict]:
    """{name: {"dtype", "shape", "sha256"}} of the tensors written to the weights file."""
    return {name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_sha256(t)}
            for name, t in sorted(state.items())}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter of a LiME model to `directory` (atomically)."""
    config: LiMEConfig = model.lime_config
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model_name(model),
        **config.to_dict(),
        "wrapped_modules": [name for name, _ in lime_modules(model)],
        MANIFEST_KEY: tensor_manifest(state),
    }
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_clusters(model, tmp)  # MoCLE's fitted instruction clustering
    return Path(directory)


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise AdapterError(f"{directory}: no such directory (expected an adapter or run directory)")
    if not path.is_file():
        raise AdapterError(f"{path}: no adapter config here (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: holds a JSON {type(meta).__name__}, not an object of adapter settings")
    if meta.get("peft_type") != PEFT_TYPE:
        raise AdapterError(f"{path}: peft_type is {meta.get('peft_type')!r}, not {PEFT_TYPE!r}")
    return meta


def config_from_meta(meta: dict) -> LiMEConfig:
    keys = set(LiMEConfig.__dataclass_fields__)
    return LiMEConfig.from_dict({k: v for k, v in meta.items() if k in keys})


def method_name(config: LiMEConfig) -> str:
    """The configs/peft/ name of the method an adapter config describes: lime_lora, lora, moe_dora, mola, ..."""
    if config.method == "plain":
        return config.variant
    if config.method in ("lime", "moe"):
        return f"{config.method}_{config.variant}"
    return config.method  # the MoE baselines defined for one variant (mola, hydralora, mixlora)


def weights_sha256(directory: str | Path) -> str:
    """sha256 of an adapter's weights file: the adapter's identity (one training run, one adapter)."""
    return hashlib.sha256((Path(directory) / WEIGHTS_NAME).read_bytes()).hexdigest()


def describe_adapter(directory: str | Path) -> dict:
    """What an evaluation run records about the adapter it evaluates: its method, LiME config, path, checksum."""
    directory = Path(directory)
    config = config_from_meta(read_adapter_config(directory))
    return {"method": method_name(config), "adapter_config": config.to_dict(),
            "checkpoint": str(directory.resolve()), "adapter_sha256": weights_sha256(directory)}


def _first_difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif (list(a) if isinstance(a, tuple | list) else a) != (list(b) if isinstance(b, tuple | list) else b):
            return f"{prefix}{key}: adapter has {a!r}, model has {b!r}"
    return None


def _weightless_copy(model: nn.Module) -> nn.Module:
    """The model with every parameter and buffer on the meta device: its structure at no memory cost."""
    memo: dict[int, Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _expected_adapter(model: nn.Module, config: LiMEConfig) -> tuple[dict[str, Tensor], list[str]]:
    """(adapter tensors by name, wrapped module names) of `model` with LiME applied under `config`; when the
    model has none yet, taken from a weightless copy, so `model` itself is not touched."""
    target = model if hasattr(model, "lime_config") else apply_lime(_weightless_copy(model), config)
    return adapter_state_dict(target), [name for name, _ in lime_modules(target)]


def _check_wrapped_modules(meta: dict, wrapped: list[str], path: Path) -> None:
    listed = meta.get("wrapped_modules")
    if listed is None:
        return
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise AdapterError(f"{path}: wrapped_modules must be a list of module names, got {listed!r}")
    if sorted(listed) != sorted(wrapped):
        extra, missing = sorted(set(listed) - set(wrapped)), sorted(set(wrapped) - set(listed))
        raise AdapterError(f"{path}: wrapped_modules does not match the modules its config wraps on this model "
                           f"(listed but not wrapped: {extra}; wrapped but not listed: {missing})")


def _read_weights(weights: Path) -> dict[str, Tensor]:
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{weights}: corrupt or truncated safetensors file ({error})") from error


def _check_tensor(key: str, tensor: Tensor, want: Tensor, record: dict | None, weights: Path) -> None:
    """One tensor against the model's expectation (shape, dtype), its manifest record and finiteness."""
    if tensor.shape != want.shape:
        raise AdapterError(f"{weights}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(want.shape)}")
    stored = dtype_name(tensor.dtype)
    if record is not None and (record.get("dtype"), record.get("shape")) != (stored, list(tensor.shape)):
        raise AdapterError(f"{weights}: {key} is stored as {stored} {list(tensor.shape)}, adapter_config.json "
                           f"records {record.get('dtype')} {record.get('shape')}")
    if tensor.dtype != want.dtype:
        raise AdapterError(f"{weights}: {key} is stored as {stored}, the config's param_dtype makes it "
                           f"{dtype_name(want.dtype)}")
    bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
    if bad:
        raise AdapterError(f"{weights}: {key} holds {bad} non-finite value(s) (NaN or inf)")
    if record is not None and tensor_sha256(tensor) != record.get("sha256"):
        raise AdapterError(f"{weights}: {key} does not match its sha256 in adapter_config.json (the data was "
                           "changed after saving)")


def _check_tensors(tensors: dict[str, Tensor], expected: dict[str, Tensor], manifest: dict | None,
                   weights: Path) -> None:
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise AdapterError(f"{weights}: has no tensor for {key} (the model wraps a module the adapter does not)")
        if key not in expected:
            raise AdapterError(f"{weights}: tensor {key} has no place in this model (other targets or model?)")
    if manifest is not None and sorted(manifest) != sorted(tensors):
        raise AdapterError(f"{weights}: holds tensors {sorted(set(tensors) - set(manifest))} not in "
                           f"adapter_config.json, lacks {sorted(set(manifest) - set(tensors))}")
    for key in sorted(tensors):
        _check_tensor(key, tensors[key], expected[key], None if manifest is None else manifest[key], weights)


def _manifest(meta: dict, directory: Path) -> dict | None:
    manifest = meta.get(MANIFEST_KEY)
    if manifest is None:
        warnings.warn(f"{directory}: adapter saved without tensor checksums (an older version): loading it with "
                      "name, shape, dtype and finiteness checks only; save it again to record them", stacklevel=3)
    elif not isinstance(manifest, dict) or not all(isinstance(v, dict) for v in manifest.values()):
        raise AdapterError(f"{directory / CONFIG_NAME}: '{MANIFEST_KEY}' must map tensor names to "
                           "{dtype, shape, sha256}")
    return manifest


def load_adapter(model: nn.Module, directory: str | Path, check_base_model: bool = True) -> nn.Module:
    """Load an adapter onto `model`, applying LiME with the saved config first if the model has none.

    Fails with AdapterError naming the file and the first mismatch: another base model, other hyperparameters,
    a wrapped_modules list the config does not produce, missing or extra tensors, another shape or dtype than
    the config implies, a non-finite value, a checksum that does not match, a corrupt/truncated weights file.
    Every check runs before the model is changed: a refused load leaves it exactly as it was.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    saved_base, current_base = meta.get("base_model_name_or_path", ""), base_model_name(model)
    if check_base_model and saved_base and current_base and saved_base != current_base:
        raise AdapterError(
            f"{directory}: adapter was trained on base model {saved_base!r}, this model is {current_base!r} "
            "(pass check_base_model=False to load it anyway)"
        )
    config = config_from_meta(meta)
    if hasattr(model, "lime_config"):
        difference = _first_difference(config.to_dict(), model.lime_config.to_dict())
        if difference:
            raise AdapterError(f"{directory}: config mismatch, {difference}")
    manifest = _manifest(meta, directory)
    expected, wrapped = _expected_adapter(model, config)
    _check_wrapped_modules(meta, wrapped, directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    tensors = _read_weights(weights)
    _check_tensors(tensors, expected, manifest, weights)
    clusters = read_clusters(directory, config)
    if not hasattr(model, "lime_config"):
        apply_lime(model, config)
    if clusters is not None:
        model.lime_clusters = clusters
    with torch.no_grad():
        for key, tensor in adapter_state_dict(model).items():
            tensor.copy_(tensors[key])
    return model
