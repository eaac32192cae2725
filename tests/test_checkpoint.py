"""Adapters on disk: round trips, refusals with a message naming the problem, atomic writes."""

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lime
from lime import checkpoint
from lime.checkpoint import CONFIG_NAME, WEIGHTS_NAME, AdapterError, atomic_directory
from lime.config import LiMEConfig
from tests.tiny import copy_of, left_padded_batch, perturb_trainable, tiny_causal_lm


@pytest.mark.parametrize(
    "config",
    [
        LiMEConfig(variant="lora", routing=dict(n_gram=2)),
        LiMEConfig(variant="dora"),
        LiMEConfig(variant="lora_fa"),
        LiMEConfig(variant="slicefine", slice_start=3),
        LiMEConfig(variant="prompt", num_virtual_tokens=5),
        LiMEConfig(variant="lora", routing=dict(router="learned", selection="topk", top_k=2)),
        LiMEConfig(variant="lora", method="plain"),
    ],
    ids=["lora", "dora", "lora_fa", "slicefine", "prompt", "learned", "plain"],
)
def test_round_trip_restores_outputs_bit_for_bit(tmp_path, config):
    base = tiny_causal_lm()
    model = lime.apply_lime(copy_of(base), config)
    perturb_trainable(model)
    ids, mask = left_padded_batch([7, 4], total=7)
    want = model(input_ids=ids, attention_mask=mask).logits
    lime.save_adapter(model, tmp_path / "adapter")

    meta = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert meta["peft_type"] == "LIME" and meta["variant"] == config.variant and meta["rank"] == config.rank
    assert meta["routing"]["n_gram"] == config.routing.n_gram
    tensors = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert not any(".base." in key for key in tensors)  # the frozen model is not in the adapter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in tensors.values()) >= trainable

    restored = lime.load_adapter(copy_of(base), tmp_path / "adapter")  # applies the saved config itself
    assert torch.equal(restored(input_ids=ids, attention_mask=mask).logits, want)


def test_lora_fa_saves_its_frozen_projection(tmp_path):
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(variant="lora_fa"))
    lime.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "model.layers.0.self_attn.q_proj.adapter.lora_A"
    assert torch.equal(tensors[key], model.get_submodule("model.layers.0.self_attn.q_proj").adapter.lora_A)


def saved(tmp_path, config):
    model = lime.apply_lime(tiny_causal_lm(), config)
    lime.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def test_mismatched_config_names_the_first_difference(tmp_path):
    directory = saved(tmp_path, LiMEConfig(rank=2))
    other = lime.apply_lime(tiny_causal_lm(), LiMEConfig(rank=4))
    with pytest.raises(AdapterError, match="rank: adapter has 2, model has 4"):
        lime.load_adapter(other, directory)


def test_mismatched_targets_are_refused(tmp_path):
    directory = saved(tmp_path, LiMEConfig(targets=("q_proj", "v_proj")))
    other = lime.apply_lime(tiny_causal_lm(), LiMEConfig(targets=("q_proj",)))
    with pytest.raises(AdapterError, match="targets"):
        lime.load_adapter(other, directory)


def test_mismatched_shapes_name_the_tensor(tmp_path):
    directory = saved(tmp_path, LiMEConfig())
    wider = tiny_causal_lm(hidden=64)
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.\w+_proj\.\S+ has shape"):
        lime.load_adapter(wider, directory)


def test_other_base_model_is_refused(tmp_path):
    directory = saved(tmp_path, LiMEConfig())
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta["base_model_name_or_path"] = "someone/another-model"
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="another-model"):
        lime.load_adapter(tiny_causal_lm(), directory)
    lime.load_adapter(tiny_causal_lm(), directory, check_base_model=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weights_are_refused(tmp_path, damage):
    directory = saved(tmp_path, LiMEConfig())
    weights = directory / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 16 + data[16:])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        lime.load_adapter(tiny_causal_lm(), directory)


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(AdapterError, match="no adapter config"):
        lime.load_adapter(tiny_causal_lm(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="peft_type is 'LORA'"):
        lime.load_adapter(tiny_causal_lm(), tmp_path)


def test_interrupted_write_leaves_the_previous_adapter(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.txt").write_text("previous")
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("half")
        raise KeyboardInterrupt
    assert (target / "old.txt").read_text() == "previous" and not (target / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("done")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]


# --- integrity: every tampering refused, naming file and tensor, and a refused load changes nothing ----------


def snapshot(model):
    """Everything a load could change: tensors (bit for bit), module types, trainability, LiME attributes."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return (state, [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()], hasattr(model, "lime_config"))


def assert_unchanged(model, before):
    state, types, grads, has_lime = snapshot(model)
    assert (types, grads, has_lime) == before[1:]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


def rewrite_tensors(directory, edit):
    """Apply `edit(tensors)` to the weights file, leaving adapter_config.json (and its checksums) as saved."""
    tensors = load_file(directory / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})


def edit_config(directory, edit):
    meta = json.loads((directory / CONFIG_NAME).read_text())
    edit(meta)
    (directory / CONFIG_NAME).write_text(json.dumps(meta))


KEY = "model.layers.1.self_attn.v_proj.expert_vectors"


def write_nan(directory):
    rewrite_tensors(directory, lambda t: t[KEY].view(-1).__setitem__(3, float("nan")))


def flip_data_byte(directory):
    """Flip one bit of one byte inside KEY's data (the header is untouched: the file still parses)."""
    weights = directory / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:header])[KEY]["data_offsets"]
    data[header + start + 1] ^= 0x01  # a low mantissa bit of the first value: still finite, a different number
    weights.write_bytes(bytes(data))


def restore_as_f16(directory):
    rewrite_tensors(directory, lambda t: t.__setitem__(KEY, t[KEY].half()))


def forge_f16_with_its_manifest(directory):
    """F16 re-store whose manifest entry is rewritten to match: refused by the dtype the config implies."""
    restore_as_f16(directory)
    tensor = load_file(directory / WEIGHTS_NAME)[KEY]
    edit_config(directory, lambda m: m["tensors"][KEY].update(dtype="F16", sha256=checkpoint.tensor_sha256(tensor)))


def drop_wrapped_module(directory):
    edit_config(directory, lambda m: m["wrapped_modules"].pop())


def rename_wrapped_module(directory):
    edit_config(directory, lambda m: m["wrapped_modules"].__setitem__(0, "model.layers.0.mlp.up_proj"))


def drop_tensor(directory):
    rewrite_tensors(directory, lambda t: t.pop(KEY))


def add_tensor(directory):
    rewrite_tensors(directory, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.expert_vectors", torch.ones(2)))


def change_shape(directory):
    rewrite_tensors(directory, lambda t: t.__setitem__(KEY, torch.zeros(t[KEY].shape[0], t[KEY].shape[1] + 1)))


def truncate(directory):
    data = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def other_rank(directory):
    edit_config(directory, lambda m: m.update(rank=m["rank"] * 2))


TAMPERING = {
    write_nan: rf"{WEIGHTS_NAME}: {KEY} holds 1 non-finite value",
    flip_data_byte: rf"{WEIGHTS_NAME}: {KEY} does not match its sha256",
    restore_as_f16: rf"{WEIGHTS_NAME}: {KEY} is stored as F16 .*records F32",
    forge_f16_with_its_manifest: rf"{WEIGHTS_NAME}: {KEY} is stored as F16, the config's param_dtype makes it F32",
    drop_wrapped_module: rf"{CONFIG_NAME}: wrapped_modules does not match .*wrapped but not listed: \['model\.",
    rename_wrapped_module: rf"{CONFIG_NAME}: wrapped_modules does not match .*listed but not wrapped: "
                           r"\['model\.layers\.0\.mlp\.up_proj'\]",
    drop_tensor: rf"{WEIGHTS_NAME}: has no tensor for {KEY}",
    add_tensor: rf"{WEIGHTS_NAME}: tensor model\.layers\.0\.mlp\.up_proj\.expert_vectors has no place",
    change_shape: rf"{WEIGHTS_NAME}: {KEY} has shape",
    truncate: rf"{WEIGHTS_NAME}: corrupt or truncated",
    other_rank: r"shape",
}


@pytest.mark.parametrize("preapplied", [False, True], ids=["plain_model", "lime_applied"])
@pytest.mark.parametrize("tamper", list(TAMPERING), ids=lambda f: f.__name__)
def test_tampered_adapter_is_refused_and_the_model_is_left_as_it_was(tmp_path, tamper, preapplied):
    config = LiMEConfig(variant="lora", routing=dict(n_gram=2))
    trained = lime.apply_lime(tiny_causal_lm(), config)
    perturb_trainable(trained)
    lime.save_adapter(trained, tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    tamper(tmp_path / "bad")

    model = lime.apply_lime(tiny_causal_lm(), config) if preapplied else tiny_causal_lm()
    before = snapshot(model)
    pattern = TAMPERING[tamper] if tamper is not other_rank or not preapplied else "rank: adapter has 4, model has 2"
    with pytest.raises(AdapterError, match=pattern):
        lime.load_adapter(model, tmp_path / "bad")
    assert_unchanged(model, before)

    lime.load_adapter(model, tmp_path / "good")  # the right adapter still loads, and is the trained one
    ids, mask = left_padded_batch([6, 3], total=6)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       trained(input_ids=ids, attention_mask=mask).logits)


def test_manifest_records_every_tensor(tmp_path):
    directory = saved(tmp_path, LiMEConfig(variant="dora"))
    manifest = json.loads((directory / CONFIG_NAME).read_text())["tensors"]
    tensors = load_file(directory / WEIGHTS_NAME)
    assert sorted(manifest) == sorted(tensors)
    for key, tensor in tensors.items():
        digest = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()  # numpy: an independent path
        assert manifest[key] == {"dtype": "F32", "shape": list(tensor.shape), "sha256": digest}


def test_adapter_saved_without_checksums_loads_with_a_warning(tmp_path):
    base = tiny_causal_lm()
    trained = lime.apply_lime(copy_of(base), LiMEConfig())
    perturb_trainable(trained)
    lime.save_adapter(trained, tmp_path / "old")
    edit_config(tmp_path / "old", lambda m: m.pop("tensors"))  # the format before checksums
    with pytest.warns(UserWarning, match="without tensor checksums"):
        model = lime.load_adapter(copy_of(base), tmp_path / "old")
    ids, mask = left_padded_batch([5], total=5)
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       trained(input_ids=ids, attention_mask=mask).logits)
    write_nan(tmp_path / "old")  # the checks that need no checksum still apply
    with pytest.warns(UserWarning), pytest.raises(AdapterError, match="non-finite"):
        lime.load_adapter(copy_of(base), tmp_path / "old")
