"""MoCLE (lime/mocle.py): the layer against a naive per-sample loop, identity at init, the offline clustering
(deterministic, sklearn's predict), the save/load round trip with the clustering, cached generation, the
collator's ids and a run of train.py. The registry suite (tests/test_methods.py) runs on `mocle/lora` too."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import lime
from lime import presets, registry
from lime.config import LiMEConfig
from lime.context import TextContext
from lime.data.collate import Collator
from lime.data.dataset import Sample, SampleId
from lime.mocle import (
    CLUSTERS_NAME,
    HashedEmbedder,
    InstructionClusters,
    MoCLELinear,
    generation_clusters,
    mocle_params,
)
from tests.tiny import left_padded_batch, perturb_trainable, tiny_causal_lm

CONFIG = LiMEConfig(method="mocle", num_clusters=3, instruction_embedder="hashed", cluster_temperature=0.5,
                    targets=("q_proj", "k_proj", "v_proj", "o_proj"), language_model_only=True)
INSTRUCTIONS = [
    "What color is the car in the image?", "What colour is the bus?", "Which color is the sky?",
    "Is the sentence grammatical? The cat sat.", "Is this sentence acceptable? Dogs barks.",
    "Does the premise entail the hypothesis?", "Does sentence one entail sentence two?",
    "What action is the person doing in the video?", "What is the man doing in this clip?",
]


def naive_mocle(layer: MoCLELinear, x: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """The formula of lime/mocle.py, one sample and one expert at a time (eval: no gate noise)."""
    s, gate = layer.scale, layer.router
    rows = []
    for b, c in enumerate(clusters.tolist()):
        g = torch.softmax((gate.proj.weight @ gate.embedding[c] + gate.proj.bias) / gate.temperature, dim=0)
        k = int(g.argmax())
        w = g[k]
        z = x[b] @ layer.base.weight.T + layer.base.bias
        expert = s * (x[b] @ layer.lora_A[k].T @ layer.lora_B[k].T)
        universal = s * (x[b] @ layer.adapter.lora_A.T @ layer.adapter.lora_B.T)
        rows.append(z + w * expert + (1 - w) * universal)
    return torch.stack(rows)


def perturbed_layer(config: LiMEConfig = CONFIG, seed: int = 0) -> tuple[MoCLELinear, TextContext]:
    torch.manual_seed(seed)
    context = TextContext()
    layer = MoCLELinear(nn.Linear(12, 10), config, context).double()
    perturb_trainable(layer, scale=0.5, seed=seed)
    return layer, context


def test_layer_equals_the_naive_per_sample_loop_outputs_and_gradients() -> None:
    layer, context = perturbed_layer()
    layer.eval()
    x = torch.randn(4, 5, 12, dtype=torch.float64)
    context.sample_clusters = torch.tensor([2, 0, 1, 2])
    expected = naive_mocle(layer, x, context.sample_clusters)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    experts = {int(torch.softmax(layer.router.proj(layer.router.embedding[c]) / 0.5, -1).argmax()) for c in range(3)}
    assert len(experts) > 1  # the perturbed gate sends the clusters to different experts: routing is exercised

    grads = []
    for forward in (layer, lambda t: naive_mocle(layer, t, context.sample_clusters)):
        layer.zero_grad()
        (forward(x) ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad})
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    assert grads[1]["router.embedding"][[0, 1, 2]].abs().sum() > 0  # the gate learns through w


def test_padding_keeps_the_frozen_output_and_noise_is_training_only() -> None:
    layer, context = perturbed_layer()
    x = torch.randn(2, 4, 12, dtype=torch.float64)
    context.sample_clusters = torch.tensor([1, 0])
    context.mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    layer.eval()
    out = layer(x)
    torch.testing.assert_close(out[0, 0], layer.base(x[0, 0]))
    torch.testing.assert_close(out[:, 1:], naive_mocle(layer, x, context.sample_clusters)[:, 1:])
    layer.train()
    torch.manual_seed(0)
    assert not torch.equal(layer(x), out)  # N(0, 0.1²) on the gate logits while training
    layer.router.noise = 0.0
    torch.testing.assert_close(layer(x), out)


def test_no_clusters_is_the_universal_expert_alone_and_bad_ids_are_refused() -> None:
    layer, context = perturbed_layer()
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    universal = layer.base(x) + layer.scale * (x @ layer.adapter.lora_A.T @ layer.adapter.lora_B.T)
    torch.testing.assert_close(layer(x), universal)
    context.sample_clusters = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="batch has 2 sequences"):
        layer(x)
    model = lime.apply_lime(tiny_causal_lm(), CONFIG)
    ids, mask = left_padded_batch([3, 2], total=3)
    for bad in ([0, 3], [-1, 0], [0.0, 1.0]):
        with pytest.raises(ValueError, match=r"not cluster ids in 0..2"):
            model(input_ids=ids, attention_mask=mask, instruction_cluster=torch.tensor(bad))


def test_vision_tower_is_refused() -> None:
    with pytest.raises(ValueError, match="peft.language_model_only"):
        MoCLELinear(nn.Linear(8, 8), CONFIG, None)


def test_count_is_the_formula_written_out() -> None:
    """(E+1)·r(d_in+d_out) + 384·C + 384·E + E; and on LLaVA-OV-7B's language model (28 blocks of q, k, v, o:
    3584 -> 3584, 512, 512, 3584) with C = 64, E = 4, r = 2: 9,232,832."""
    layer, _ = perturbed_layer()
    trainable = sum(p.numel() for n, p in layer.named_parameters() if not n.startswith("base."))  # base unfrozen
    assert trainable == mocle_params(12, 10, CONFIG, registry.VARIANTS["lora"]) == 5 * 2 * 22 + 384 * 7 + 4
    config = presets.lime_config(presets.compose(["model=llava_ov_7b", "peft=mocle"]))
    shapes = [(3584, 3584), (3584, 512), (3584, 512), (3584, 3584)]
    assert 28 * sum(registry.layer_params(i, o, config) for i, o in shapes) == 9_232_832


def test_identity_at_init_with_clusters(tiny_llava, image_batch) -> None:
    base = tiny_llava[0]
    inputs = {k: v for k, v in image_batch.items() if k != "labels"}
    config = presets.lime_config(presets.compose(["model=tiny_llava_ov", "peft=mocle"]))
    with torch.no_grad():
        reference = base(**inputs).logits
        model = lime.apply_lime(copy.deepcopy(base), config)
        logits = model(**inputs, instruction_cluster=torch.tensor([5, 63])).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)


def test_clustering_is_deterministic_and_predicts_as_kmeans() -> None:
    from sklearn.cluster import KMeans

    texts = INSTRUCTIONS * 2 + INSTRUCTIONS[:3]  # repeats: weighted by their counts
    first = InstructionClusters.fit(texts, 3, "hashed", seed=7)
    again = InstructionClusters.fit(list(reversed(texts)), 3, "hashed", seed=7)
    assert torch.equal(first.centroids, again.centroids) and first.centroids.shape == (3, HashedEmbedder.dim)
    points = HashedEmbedder()(INSTRUCTIONS)
    oracle = KMeans(n_clusters=3).fit(points[:3])  # any fitted k-means: predict with our centroids as its own
    oracle.cluster_centers_ = first.centroids.numpy().astype(np.float64)
    assert first.predict(INSTRUCTIONS).tolist() == oracle.predict(points.astype(np.float64)).tolist()
    assert len(set(first.predict(INSTRUCTIONS).tolist())) == 3
    with pytest.raises(ValueError, match="peft.num_clusters: 20 clusters, but the training set has only 9"):
        InstructionClusters.fit(texts, 20, "hashed", seed=0)


def test_save_load_round_trip_with_the_clustering(tmp_path) -> None:
    ids, mask = left_padded_batch([7, 4, 6], total=7)
    model = lime.apply_lime(tiny_causal_lm(), CONFIG)
    perturb_trainable(model)
    lime.mocle.fit_instruction_clusters(model, INSTRUCTIONS, seed=0)
    clusters = model.lime_clusters.predict(INSTRUCTIONS[2:5])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, instruction_cluster=clusters).logits
        universal_only = lime.apply_lime(tiny_causal_lm(), CONFIG)
        universal_only.load_state_dict(model.state_dict())
        assert not torch.allclose(universal_only(input_ids=ids, attention_mask=mask).logits, expected)
    lime.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / CLUSTERS_NAME).exists()

    loaded = lime.load_adapter(tiny_causal_lm(), tmp_path / "adapter")
    assert torch.equal(loaded.lime_clusters.centroids, model.lime_clusters.centroids)
    assert torch.equal(loaded.lime_clusters.predict(INSTRUCTIONS), model.lime_clusters.predict(INSTRUCTIONS))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask, instruction_cluster=clusters).logits, expected)
    with pytest.raises(ValueError, match="has no 'instruction_cluster'"):
        loaded(input_ids=ids, attention_mask=mask)

    InstructionClusters(torch.zeros(4, HashedEmbedder.dim), "hashed").save(tmp_path / "adapter")  # not this run's
    with pytest.raises(ValueError, match="4 clusters by 'hashed', the adapter's config says 3 by 'hashed'"):
        lime.load_adapter(tiny_causal_lm(), tmp_path / "adapter")


def test_cached_generation_sees_the_clusters() -> None:
    """generate (KV cache) under `generation_clusters` = a greedy loop of full forwards with the ids as input."""
    ids, mask = left_padded_batch([6, 4], total=6)
    model = lime.apply_lime(tiny_causal_lm(), CONFIG).eval()
    perturb_trainable(model)
    clusters = torch.tensor([2, 0])
    with torch.no_grad(), generation_clusters(model, clusters):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    tokens, attention = ids, mask
    with torch.no_grad():
        for step in range(4):
            logits = model(input_ids=tokens, attention_mask=attention, instruction_cluster=clusters).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, rtol=1e-5, atol=1e-5)
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        other = model(input_ids=ids, attention_mask=mask, instruction_cluster=torch.tensor([0, 2])).logits[:, -1]
    assert torch.equal(out.sequences, tokens)
    assert not torch.allclose(other, out.logits[0])  # the ids matter


def test_collator_adds_each_samples_cluster(tiny_llava) -> None:
    clusters = InstructionClusters.fit(INSTRUCTIONS, 3, "hashed", seed=0)
    samples = [Sample(SampleId("train", i), "text", q, "yes") for i, q in enumerate(INSTRUCTIONS[3:7])]
    for mode in ("train", "generate"):
        batch = Collator(tiny_llava[1], mode, instruction_clusters=clusters)(samples)
        inputs = batch if mode == "train" else batch.inputs
        assert inputs["instruction_cluster"].tolist() == clusters.predict(INSTRUCTIONS[3:7]).tolist()
    assert "instruction_cluster" not in Collator(tiny_llava[1], "train")(samples)


def test_train_py_fits_saves_and_reuses_the_clustering(tmp_path) -> None:
    from lime.run import run
    from tests.test_train import SMALL, compose_config

    overrides = [*SMALL, "peft=mocle", "peft.instruction_embedder=hashed", "peft.num_clusters=8"]
    results = run(compose_config(*overrides), tmp_path)
    info = json.loads((tmp_path / "run_info.json").read_text())
    # 2 blocks of q, k, v, o (64 -> 64, 32, 32, 64): 2 · (5·2·(128+96+96+128) + 4·(384·(8+4) + 4))
    assert info["status"] == "completed" and info["trainable_params"] == 2 * (10 * 448 + 4 * (384 * 12 + 4))
    clusters = InstructionClusters.load(tmp_path / "adapter")
    assert clusters.num_clusters == 8 and clusters.embedder == "hashed"
    again = run(compose_config(*overrides, "mode=eval", f"checkpoint={tmp_path}"), tmp_path / "eval")
    assert again["tasks"] == results["tasks"]

