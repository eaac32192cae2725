"""Representations of test samples at the adapted layers, recorded with forward hooks (scripts/analyze.py).

For each wrapped Linear of the language model (lime.inject.lime_modules) and each sample, pooled over the
sample's real tokens (the prompt: media tokens and question, no answer):

    output[s]               mean of the layer output h (the modulated representation of a LiME layer)
    output_by_position[s]   (n, d): mean of h over the tokens at position p = t mod n of their n-gram window
    routing_by_position[s]  (n, E): the same for the routing weights w (LiME layers only)

t is a token's index among the sample's real tokens (lime.routing.token_indices), n the routing window.
Pooling inside the hook keeps memory at samples x layers x n x d, whatever the sequence length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lime.data.collate import Collator, GenerationBatch
from lime.data.dataset import MMTDataset
from lime.inject import language_model, lime_modules
from lime.layer import LiMELinear, PEFTLinear
from lime.routing import token_indices


@dataclass
class LayerRecord:
    output: list[np.ndarray] = field(default_factory=list)
    output_by_position: list[np.ndarray] = field(default_factory=list)
    routing_by_position: list[np.ndarray] = field(default_factory=list)


@dataclass
class Representations:
    """Per-layer arrays over the same samples, with each sample's id ("split[row]") and task."""

    ids: list[str]
    tasks: list[str]
    n_gram: int
    output: dict[str, np.ndarray]  # module name -> (N, d)
    output_by_position: dict[str, np.ndarray]  # (N, n, d)
    routing_by_position: dict[str, np.ndarray]  # (N, n, E), LiME layers only

    def aligned(self, ids: list[str]) -> Representations:
        """The same arrays restricted to and ordered by `ids` (for comparing runs sample by sample)."""
        where = {sample: i for i, sample in enumerate(self.ids)}
        rows = np.array([where[sample] for sample in ids], dtype=np.int64)
        pick = lambda arrays: {name: array[rows] for name, array in arrays.items()}  # noqa: E731
        return Representations(list(ids), [self.tasks[i] for i in rows], self.n_gram, pick(self.output),
                               pick(self.output_by_position), pick(self.routing_by_position))


def _pool_by_position(values: Tensor, position: Tensor, valid: Tensor, n_gram: int) -> Tensor:
    """(B, T, D) -> (B, n, D): mean over the real tokens at each window position (0 where there is none)."""
    one_hot = torch.nn.functional.one_hot(position.clamp_min(0) % n_gram, n_gram).to(values.dtype)
    one_hot = one_hot * valid.unsqueeze(-1).to(values.dtype)  # (B, T, n)
    sums = torch.einsum("btn,btd->bnd", one_hot, values)
    return sums / one_hot.sum(dim=1).clamp_min(1.0).unsqueeze(-1)


class Recorder:
    """Forward hooks on the chosen layers; `mask` is set to the batch's attention mask before each forward."""

    def __init__(self, model: nn.Module, n_gram: int, modules: str | None = None) -> None:
        self.n_gram, self.mask = n_gram, None
        pattern = re.compile(modules) if modules else None
        self.records: dict[str, LayerRecord] = {}
        self.handles = []
        text = {id(m) for m in language_model(model).modules()}  # vision-tower tokens are patches: left out
        for name, module in lime_modules(model):
            if not isinstance(module, PEFTLinear) or id(module) not in text:
                continue
            if pattern and not pattern.search(name):
                continue
            self.records[name] = LayerRecord()
            self.handles.append(module.register_forward_hook(self._output_hook(name)))
            if isinstance(module, LiMELinear):
                self.handles.append(module.router.register_forward_hook(self._routing_hook(name)))

    def _matches(self, value: Tensor) -> bool:
        """Language-model calls only: the text sequence has the attention mask's shape."""
        return value.dim() == 3 and tuple(value.shape[:2]) == tuple(self.mask.shape)

    def _pool(self, value: Tensor) -> tuple[np.ndarray, np.ndarray]:
        valid = self.mask.bool()
        value = value.detach().float()
        weights = valid.unsqueeze(-1).float()
        mean = (value * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        by_position = _pool_by_position(value, token_indices(valid), valid, self.n_gram)
        return mean.cpu().numpy(), by_position.cpu().numpy()

    def _output_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self.mask is not None and self._matches(output):
                mean, by_position = self._pool(output)
                self.records[name].output.append(mean)
                self.records[name].output_by_position.append(by_position)
        return hook

    def _routing_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
            weights = output[0]  # w: softmax weights, shared within each n-gram window
            if self.mask is not None and self._matches(weights):
                self.records[name].routing_by_position.append(self._pool(weights)[1])
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def record(model: nn.Module, processor, splits: Mapping[str, MMTDataset], tasks: Mapping[str, str],
           n_gram: int, batch_size: int = 8, modules: str | None = None) -> Representations:
    """Run every split's prompts through `model` (no generation) and pool each layer's outputs per sample."""
    recorder = Recorder(model, n_gram, modules)
    if not recorder.records:
        raise ValueError(f"no adapted language-model layer matches {modules!r}")
    ids, labels = [], []
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for split, dataset in splits.items():
                loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                    collate_fn=Collator(processor, mode="generate"))
                for batch in loader:
                    batch: GenerationBatch
                    if batch.inputs is None:
                        continue
                    inputs = batch.inputs.to(device)
                    recorder.mask = inputs["attention_mask"]
                    model(**inputs)
                    ids += [str(sample) for sample in batch.ids]
                    labels += [tasks[split]] * len(batch.ids)
    finally:
        recorder.remove()
    return _stack(recorder.records, ids, labels, n_gram)


def _stack(records: Mapping[str, LayerRecord], ids: list[str], labels: list[str], n_gram: int) -> Representations:
    def concat(parts: Iterable[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(parts), axis=0)

    output, by_position, routing = {}, {}, {}
    for name, rec in records.items():
        if not rec.output:
            continue
        if sum(len(part) for part in rec.output) != len(ids):
            raise RuntimeError(f"layer {name}: recorded {sum(len(p) for p in rec.output)} samples, expected "
                               f"{len(ids)} (was it called more than once per forward?)")
        output[name], by_position[name] = concat(rec.output), concat(rec.output_by_position)
        if rec.routing_by_position:
            routing[name] = concat(rec.routing_by_position)
    if not output:
        raise RuntimeError("no adapted layer saw the text sequence (do the hooks sit on the language model?)")
    return Representations(ids, labels, n_gram, output, by_position, routing)
