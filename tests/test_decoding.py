"""Cached decoding under every transformers decoding strategy equals the uncached full forward.

The routing state of n-gram windows and the decoding factors live with the KV cache (lime.context.CacheState)
and follow what `generate` does to the cache: beam reordering, cropping (assisted and prompt-lookup decoding),
batch selection and repetition. Each strategy is checked against one full forward over the generated
sequences, on a left-padded batch, for every variant and n-gram size.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lime
from lime.config import LiMEConfig
from lime.context import CacheState
from tests.tiny import VOCAB, left_padded_batch, perturb_trainable, tiny_causal_lm

NEW = 5  # new tokens per generation
VARIANTS = ["lora", "dora", "lora_fa", "slicefine", "prompt"]
STRATEGIES = ["greedy", "sampling", "beam", "assisted", "prompt_lookup"]
# Every variant with n-gram 1-4 (LiME prompt tuning has no n-gram windows: one routing decision per sample).
CASES = [(v, n) for v in VARIANTS for n in ([1] if v == "prompt" else [1, 2, 3, 4])]


def lime_model(variant: str, n_gram: int, method: str = "lime", seed: int = 0, **routing):
    model = lime.apply_lime(tiny_causal_lm(seed=seed), LiMEConfig(
        variant=variant, method=method, routing=dict(n_gram=n_gram, **routing)))
    perturb_trainable(model, scale=0.5, seed=seed)
    return model.eval()


def full_forward_logits(model, sequences, mask, prompt_length):
    """Logits of one uncached forward over prompt + generated tokens, positions as `generate` assigns them;
    labels mark the generated tokens as the answer (what LiME prompt tuning routes around)."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    labels = sequences.masked_fill(torch.arange(sequences.shape[1]) < prompt_length, -100)
    with torch.no_grad():
        return model(input_ids=sequences, attention_mask=mask, position_ids=positions, labels=labels,
                     use_cache=False).logits


def inputs_for(strategy):
    if strategy in ("assisted", "prompt_lookup"):  # transformers runs these on one sequence
        ids, mask = left_padded_batch([9], total=11, seed=1)
        if strategy == "prompt_lookup":  # a repeated pair, so that the lookup drafts (and gets refused)
            ids[0, 2:] = torch.tensor([41, 5, 17, 33, 9, 60, 5, 17, 33])
        return ids, mask
    return left_padded_batch([7, 4], total=7, seed=1)


def generate(model, strategy, ids, mask):
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, return_dict_in_generate=True, output_logits=True,
                  pad_token_id=0, eos_token_id=None)
    if strategy == "sampling":
        torch.manual_seed(0)
        kwargs.update(do_sample=True, top_k=0)
    elif strategy == "beam":
        kwargs.update(num_beams=2, do_sample=False, output_scores=True, length_penalty=0.0)
    elif strategy == "assisted":
        assistant = tiny_causal_lm(seed=1)  # another model: most of its drafts are refused, the cache cropped
        # Always 3 drafted tokens: a refused draft then reaches into the next n-gram window.
        assistant.generation_config.update(num_assistant_tokens=3, num_assistant_tokens_schedule="constant",
                                           assistant_confidence_threshold=0.0)
        kwargs.update(assistant_model=assistant, do_sample=False)
    elif strategy == "prompt_lookup":
        kwargs.update(prompt_lookup_num_tokens=3, max_matching_ngram_size=2, do_sample=False)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)


@pytest.fixture
def cache_ops(monkeypatch):
    """The cache operations the kept routing state followed during a test."""
    seen = []
    follow = CacheState.follow

    def spy(self, op, cache, *args):
        seen.append(op)
        return follow(self, op, cache, *args)

    monkeypatch.setattr(CacheState, "follow", spy)
    return seen


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("variant,n_gram", CASES)
def test_generate_equals_the_full_forward(strategy, variant, n_gram, cache_ops):
    model = lime_model(variant, n_gram)
    ids, mask = inputs_for(strategy)
    out = generate(model, strategy, ids, mask)
    sequences, prompt = out.sequences, ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(len(sequences), NEW, dtype=mask.dtype)], dim=1)
    full = full_forward_logits(model, sequences, full_mask, prompt)
    if strategy == "beam":
        # The winning beam's score is the sum of its tokens' log-probabilities (length_penalty 0).
        logprobs = full[:, prompt - 1 : -1].log_softmax(-1).gather(-1, sequences[:, prompt:, None])
        torch.testing.assert_close(out.sequences_scores, logprobs.sum(dim=(1, 2)), atol=2e-4, rtol=0)
    else:
        assert len(out.logits) == NEW
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits, full[:, prompt - 1 + step], atol=2e-5, rtol=0)
    if variant != "prompt":  # the cache operations each strategy must have applied to the routing state
        expected = {"beam": "reorder_cache", "assisted": "crop", "prompt_lookup": "crop"}.get(strategy)
        assert expected is None or expected in cache_ops


@pytest.mark.parametrize("method,variant", [("moe", "lora"), ("lime", "dora")])
def test_beam_search_with_moe_and_lime(method, variant):
    """The MoE baselines' routers keep their n-gram state with the cache too."""
    routing = dict(router="learned", selection="topk", top_k=2) if method == "moe" else {}
    model = lime_model(variant, 3, method=method, **routing)
    ids, mask = inputs_for("beam")
    out = generate(model, "beam", ids, mask)
    full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], dim=1)
    full = full_forward_logits(model, out.sequences, full_mask, ids.shape[1])
    logprobs = full[:, 6:-1].log_softmax(-1).gather(-1, out.sequences[:, 7:, None])
    torch.testing.assert_close(out.sequences_scores, logprobs.sum(dim=(1, 2)), atol=2e-4, rtol=0)


def step(model, ids, mask, cache, start, stop):
    """Decode tokens start..stop-1 one at a time with `cache`; their logits."""
    logits = []
    for t in range(start, stop):
        with torch.no_grad():
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                        use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def prefill(model, ids, mask, length):
    with torch.no_grad():
        out = model(input_ids=ids[:, :length], attention_mask=mask[:, :length], use_cache=True)
    return out.logits, out.past_key_values


def uncached(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("n_gram", [2, 3])
def test_cache_repeat_select_and_copy(n_gram):
    """batch_repeat_interleave, batch_select_indices and copy.deepcopy of a cache mid-sequence."""
    model = lime_model("lora", n_gram)
    ids, mask = left_padded_batch([10, 6, 3], total=10, seed=2)
    _, cache = prefill(model, ids, mask, 4)
    step(model, ids, mask, cache, 4, 6)
    cache.batch_repeat_interleave(2)
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    ids2, mask2 = ids[rows].clone(), mask[rows]
    ids2[1::2, 6:] = torch.randint(1, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))  # copies diverge
    got = step(model, ids2, mask2, cache, 6, 8)
    torch.testing.assert_close(got, uncached(model, ids2, mask2)[:, 6:8], atol=2e-5, rtol=0)
    keep = torch.tensor([1, 2, 5])
    cache.batch_select_indices(keep)
    forked = copy.deepcopy(cache)
    got = step(model, ids2[keep], mask2[keep], cache, 8, 10)
    want = uncached(model, ids2[keep], mask2[keep])[:, 8:10]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    other = ids2[keep].clone()
    other[:, 8:] = torch.flip(other[:, 8:], dims=[1])
    got = step(model, other, mask2[keep], forked, 8, 10)  # the copy kept its own state
    torch.testing.assert_close(got, uncached(model, other, mask2[keep])[:, 8:10], atol=2e-5, rtol=0)


def test_crop_into_a_window():
    """Rolling back past a window's anchor: the next tokens route on the anchor kept before the crop."""
    model = lime_model("lora", 4)
    ids, mask = left_padded_batch([12, 9], total=12, seed=3)
    _, cache = prefill(model, ids, mask, 5)
    step(model, ids, mask, cache, 5, 11)
    cache.crop(-5)  # back to 6 tokens: the window of tokens 4..7 of row 0 was opened before
    other = ids.clone()
    other[:, 6:] = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))
    got = step(model, other, mask, cache, 6, 12)
    torch.testing.assert_close(got, uncached(model, other, mask)[:, 6:12], atol=2e-5, rtol=0)


def test_interleaved_batches_keep_their_own_state():
    """Two caches of the same batch size decoded in turn (a cache reused after other batches ran)."""
    model = lime_model("dora", 3)
    (ids_a, mask_a), (ids_b, mask_b) = left_padded_batch([9, 5], 9, seed=4), left_padded_batch([9, 7], 9, seed=5)
    _, cache_a = prefill(model, ids_a, mask_a, 3)
    _, cache_b = prefill(model, ids_b, mask_b, 4)
    got_a, got_b = [], []
    for t in range(4, 9):
        got_a.append(step(model, ids_a, mask_a, cache_a, t - 1, t))
        got_b.append(step(model, ids_b, mask_b, cache_b, t, t + 1) if t < 8 else None)
    got_a.append(step(model, ids_a, mask_a, cache_a, 8, 9))
    torch.testing.assert_close(torch.cat(got_a, 1), uncached(model, ids_a, mask_a)[:, 3:9], atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.cat(got_b[:-1], 1), uncached(model, ids_b, mask_b)[:, 4:8], atol=2e-5, rtol=0)


def test_a_foreign_cache_is_refused():
    """A cache filled without this LiME model's routing state: a clear error, not wrong numbers."""
    model = lime_model("lora", 2)
    base = tiny_causal_lm()
    ids, mask = left_padded_batch([6], total=6)
    with torch.no_grad():
        cache = base(input_ids=ids[:, :3], attention_mask=mask[:, :3], use_cache=True).past_key_values
    with pytest.raises(RuntimeError, match="routing state"):
        step(model, ids, mask, cache, 3, 5)


@pytest.mark.parametrize("prompt_context", ["prompt", "input"])
def test_prompt_routing_agrees_between_teacher_forcing_and_generation(prompt_context):
    """LiME prompt tuning routes on the prompt alone: a teacher-forced forward (prompt + answer, right-padded,
    labels on the answer, as the training collator builds it) routes and predicts as generation did.
    `routing.prompt_context=input` (the released code) routes on the answer too, so the two disagree."""
    model = lime_model("prompt", 1, prompt_context=prompt_context)
    prompts = []
    model.lime_prompt.register_forward_hook(lambda module, args, out: prompts.append(out))
    lengths = [7, 4]
    ids, mask = left_padded_batch(lengths, total=7, seed=1)
    out = generate(model, "greedy", ids, mask)
    answers = out.sequences[:, 7:]
    forced, forced_mask = torch.zeros(2, 7 + NEW, dtype=torch.long), torch.zeros(2, 7 + NEW, dtype=torch.long)
    labels = torch.full_like(forced, -100)
    for row, length in enumerate(lengths):
        forced[row, :length], forced[row, length : length + NEW] = ids[row, -length:], answers[row]
        forced_mask[row, : length + NEW] = 1
        labels[row, length : length + NEW] = answers[row]
    with torch.no_grad():
        logits = model(input_ids=forced, attention_mask=forced_mask, labels=labels).logits
    assert len(prompts) == 2  # one routing decision per sample at generation, one in the teacher-forced forward
    if prompt_context == "input":
        assert not torch.allclose(prompts[1], prompts[0], atol=1e-3)
        return
    torch.testing.assert_close(prompts[1], prompts[0], atol=1e-6, rtol=0)
    for row, length in enumerate(lengths):
        for step in range(NEW):
            torch.testing.assert_close(logits[row, length - 1 + step], out.logits[step][row], atol=2e-5, rtol=0)
