"""Prompt tuning and LiME prompt tuning (docs/method.md §1.1).

N virtual tokens are prepended to the language model's input embeddings:

    prompt = base + δ ⊙ P + γ · δ ⊙ p_s          (plain prompt tuning: prompt = base + δ)

base (N x d) is frozen and initialised from vocabulary embeddings, δ is trainable (zero init). Routing is per
sample: Z = (base + c)[..., C], Ẑ = δ[..., C], c the mean embedding of the sample's prompt: its non-pad tokens
before the first answer token. In training the answer starts at the first position whose `label` (passed to
the model) is not -100; in generation the first forward holds the prompt alone, or, in assisted and
prompt-lookup decoding, the prompt and k - 1 drafted tokens, of which it asks the last k logits
(`logits_to_keep=k`). So teacher-forced training and every decoding strategy route on the same c. A full
forward with neither (e.g. `generate(use_cache=False)`, which reruns the whole sequence) takes every token as
the prompt.
`routing.prompt_context=input` keeps the released code's c, the mean over the whole input (answer included in
training, which generation cannot see).

Hooks do the work, so the model's `forward` and `generate` are untouched and the prompts are present in both.
On the model, one records the `labels` and `logits_to_keep` of each call (to find the prompt). On the language
model, a pre-hook prepends the prompts (at a prefill) and extends the attention mask and position ids (at every
call, so cached decoding sees N more positions); a post-hook removes the N prompt positions from the hidden
states of a prefill, so logits and labels keep the caller's length and labels need no extension.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from lime.balance import RoutingStats, routing_stats
from lime.config import LiMEConfig
from lime.context import _cache_length
from lime.layer import add_expert_vectors
from lime.routing import Router

IGNORE_INDEX = -100  # label of the positions the loss skips (the prompt, padding)


class PromptTuning(nn.Module):
    """The virtual tokens and, for `method: lime`, their expert modulation."""

    def __init__(self, embeddings: nn.Embedding, config: LiMEConfig, seed: int = 0) -> None:
        super().__init__()
        dtype, device = getattr(torch, config.param_dtype), embeddings.weight.device
        n, width = config.num_virtual_tokens, embeddings.embedding_dim
        generator = torch.Generator().manual_seed(seed)
        token_ids = torch.randint(0, embeddings.num_embeddings, (n,), generator=generator).to(device)
        with torch.no_grad():
            self.register_buffer("prompt_base", embeddings.weight[token_ids].detach().to(dtype).clone())
        self.prompt_delta = nn.Parameter(torch.zeros(n, width, dtype=dtype, device=device))
        self.routed = config.method == "lime"
        self.shared_vector = self.shared_gate = self.router = None
        if self.routed:
            add_expert_vectors(self, width, config, dtype, device)
            # One routing decision per virtual token and sample: no n-gram windows over the prompt axis.
            routing = dataclasses.replace(config.routing, n_gram=1)
            self.router = Router(width, width, config.num_experts, routing).to(device)
            if self.router.proj is not None:
                self.router.proj.to(dtype)
        self.track_routing = False
        self.routing_stats: RoutingStats | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_delta.shape[0]

    def forward(self, context: Tensor) -> Tensor:
        """The (B, N, d) prompts for samples whose mean input embedding is `context` (B, d)."""
        base, delta = self.prompt_base, self.prompt_delta
        batch = context.shape[0]
        if not self.routed:
            return (base + delta).expand(batch, -1, -1)
        anchored = base + context.to(base.dtype).unsqueeze(1)  # (B, N, d)
        delta_b = delta.expand(batch, -1, -1)
        valid = torch.ones(batch, self.num_virtual_tokens, dtype=torch.bool, device=base.device)
        weights, routed, selected = self.router(anchored, anchored, delta_b, valid)
        if self.training or self.track_routing:
            self.routing_stats = routing_stats(weights, selected, valid)
        modulation = routed.to(delta.dtype) @ self.expert_vectors
        if self.shared_vector is not None:
            modulation = modulation + self.shared_gate * self.shared_vector
        return base + delta_b * modulation


def _mean_embedding(embeds: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return embeds.mean(dim=1)
    weights = mask.to(embeds.dtype).unsqueeze(-1)
    return (embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _prompt_mask(mask: Tensor | None, labels: Tensor | None, logits_to_keep: Any, shape: torch.Size,
                 ) -> Tensor | None:
    """(B, T) bool: the non-pad tokens of the prompt, before each row's first answer token: the first label
    that is not -100; without labels, the last k - 1 positions of a call that asks for k logits are drafted
    tokens (assisted decoding); otherwise every token is the prompt (a generation prefill)."""
    if labels is not None:
        if labels.shape != shape:
            raise ValueError(f"LiME prompt tuning: labels of shape {tuple(labels.shape)} do not match the language "
                             f"model's input of shape {tuple(shape)}; it routes on the tokens before the answer")
        before_answer = (labels != IGNORE_INDEX).long().cumsum(dim=-1) == 0
    elif isinstance(logits_to_keep, int) and logits_to_keep > 1:
        before_answer = torch.arange(shape[1], device=mask.device if mask is not None else None)
        before_answer = (before_answer <= shape[1] - logits_to_keep).expand(*shape)
    else:
        return mask
    return before_answer if mask is None else before_answer & mask.bool()


def _shift_positions(position_ids: Tensor, n: int, prefill: bool) -> Tensor:
    """Positions of (..., T) shifted past the prompts; at a prefill the prompts take 0 … N-1 in front."""
    shifted = position_ids + n
    if not prefill:
        return shifted
    front = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
    return torch.cat([front.expand(*position_ids.shape[:-1], n), shifted], dim=-1)


def attach_prompt(model: nn.Module, text_model: nn.Module, config: LiMEConfig) -> PromptTuning:
    """Register the prompt module on `model` (as `model.lime_prompt`) and its two hooks on `text_model`."""
    prompt = PromptTuning(text_model.get_input_embeddings(), config).train(text_model.training)
    model.lime_prompt = prompt
    n = prompt.num_virtual_tokens
    state: dict[str, Any] = {"prefill": False, "labels": None, "logits_to_keep": None}
    whole_input = config.routing.prompt_context == "input"

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            raise ValueError("LiME prompt tuning expects the language model to be called with keyword arguments")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = module.get_input_embeddings()(kwargs.pop("input_ids"))
            kwargs["input_ids"] = None
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError("LiME prompt tuning needs the 2-D padding mask at the language model")
        state["prefill"] = _cache_length(kwargs.get("past_key_values")) == 0
        if state["prefill"]:
            routed_on = mask if whole_input else \
                _prompt_mask(mask, state["labels"], state["logits_to_keep"], embeds.shape[:2])
            prompts = prompt(_mean_embedding(embeds, routed_on)).to(embeds.dtype)
            embeds = torch.cat([prompts, embeds], dim=1)
        kwargs["inputs_embeds"] = embeds
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _shift_positions(kwargs["position_ids"], n, state["prefill"])
        return args, kwargs

    def after(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if state["prefill"]:
            output.last_hidden_state = output.last_hidden_state[:, n:]
            if getattr(output, "hidden_states", None) is not None:
                output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output

    def record_answer(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state["labels"], state["logits_to_keep"] = kwargs.get("labels"), kwargs.get("logits_to_keep")

    def forget_answer(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        state["labels"] = state["logits_to_keep"] = None

    model.lime_hooks = [
        text_model.register_forward_pre_hook(before, with_kwargs=True),
        text_model.register_forward_hook(after, with_kwargs=True),
    ]
    if model is not text_model:
        model.lime_hooks += [model.register_forward_pre_hook(record_answer, with_kwargs=True),
                             model.register_forward_hook(forget_answer, with_kwargs=True, always_call=True)]
    return prompt
