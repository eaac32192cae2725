"""Adapters on disk, in the files researchers know from HF peft.

    adapter_model.safetensors   the LiME tensors (trainable ones, and LoRA-FA's frozen A / the prompt base)
    adapter_config.json         "peft_type": "LIME", every hyperparameter, the base model's name, the wrapped modules

Writes are atomic (a temporary directory renamed into place), loads never unpickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lime.config import LiMEConfig
from lime.inject import apply_lime, lime_modules

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "LIME"


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


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter of a LiME model to `directory` (atomically)."""
    config: LiMEConfig = model.lime_config
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    meta = {
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model_name(model),
        **config.to_dict(),
        "wrapped_modules": [name for name, _ in lime_modules(model)],
    }
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
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


def load_adapter(model: nn.Module, directory: str | Path, check_base_model: bool = True) -> nn.Module:
    """Load an adapter onto `model`, applying LiME with the saved config first if the model has none.

    Fails with AdapterError naming the first mismatch: another base model, other hyperparameters, other
    wrapped modules or tensor shapes, or a corrupt/truncated weights file.
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
    else:
        apply_lime(model, config)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{weights}: missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{weights}: corrupt or truncated safetensors file ({error})") from error
    expected = adapter_state_dict(model)
    for key in sorted(set(expected) | set(tensors)):
        if key not in tensors:
            raise AdapterError(f"{weights}: has no tensor for {key} (the model wraps a module the adapter does not)")
        if key not in expected:
            raise AdapterError(f"{weights}: tensor {key} has no place in this model (other targets or model?)")
        if tensors[key].shape != expected[key].shape:
            raise AdapterError(
                f"{weights}: {key} has shape {tuple(tensors[key].shape)}, the model expects "
                f"{tuple(expected[key].shape)}"
            )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(tensors[key])
    return model
