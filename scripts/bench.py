"""Efficiency benchmark: the frozen base, LoRA, LiME and the MoE-PEFT baselines on the same work, in one run.

    python scripts/bench.py                        # default CPU workload (about 10 minutes on 2 cores)
    python scripts/bench.py --quick                # a small model, for smoke tests (seconds)
    python scripts/bench.py --threads 1 --clock cpu --repeats 7 --with-reference   # the README's numbers
    python scripts/bench.py --device cuda --dtype bfloat16 --batch 8 --seq 1024 --hidden 2048
    python scripts/bench.py --methods lora,lime_lora --repeats 9 --no-decode

What is measured, per method (the model is built once from a Qwen2 config with random weights, then copied and
wrapped for every method, so every method runs exactly the same frozen model on exactly the same tokens):

* **Training step**: forward + backward + AdamW step on one batch of `--batch` x `--seq` random tokens with an
  all-ones attention mask, causal-LM loss on every token, plus the balance loss c·(α L_imp + β L_KL) of
  docs/method.md §3 (paper values, every step) for the routed methods. The floor `base` has no adapter: it runs the
  frozen model forward and the backward that any adapter on the targets needs (the outputs of the lowest
  target layers are made leaves that require a gradient: backward runs down to them, no further), without
  an optimizer.
* **Cached greedy decoding**: a `--prompt`-token prefill (not timed) then `--new-tokens` single-token steps
  through the KV cache with the growing attention mask, as `generate` does, in eval mode; tokens/s =
  batch x new tokens / time.
* **Peak training memory** of one training step: on CUDA `torch.cuda.max_memory_allocated`. On CPU the
  allocations of the torch allocator are accounted exactly with the profiler's memory timeline
  (`profile_memory=True`, every tensor's creation and destruction during the step): peak = bytes live at the
  step's start (weights, buffers, optimizer state; gradients are set to None between steps) + the highest
  running total of the bytes allocated during the step. This is the CPU analogue of `max_memory_allocated`:
  deterministic, and free of what the process's resident-set peak mixes in (the Python heap, allocator
  caching, a peak that only ever grows across methods run in one process).
* Trainable parameters.
* **One wrapped layer at the paper's shapes** (`--no-layer` skips it): the four attention projections of one
  decoder layer of LLaVA-OV-0.5B (q/o 896→896, k/v 896→128) and of LLaVA-OV-7B (q/o 3584→3584, k/v 3584→512;
  keys with suffix `_7b`), each wrapped by the method: forward + backward (+ balance terms) on batch x seq
  tokens (at the 7B shapes a quarter of them and `--layer-repeats-7b` rounds, to keep the CPU run short),
  summed over the four; a decoding call of the four on one new token per sequence through the state kept with
  the KV cache; and the bytes the autograd graph holds for the backward. The whole model's step dilutes what an
  adapter costs with the frozen MLP, attention and LM head, identical for every method; this isolates it.

Methods: `base` (the floor), `lora`, `dora`, `lime_lora` (auto selection), `lime_lora_topk` (k = 2),
`lime_lora_ngram2`, `lime_dora`, and the MoE-PEFT baselines `moe_lora`, `moe_dora`, `hydralora`, `mixlora`;
`--methods` takes any configs/peft preset by name; `peft_lora` and `peft_dora` are HF peft's own LoRA and
DoRA with the same r, alpha and dropout (outside anchors: the cost users of LoRA already pay). Every method is
its configs/peft preset composed as train.py composes it (the MoE baselines with configs/routing/moe.yaml:
learned router, top-2, τ = 1, no jitter), with the benchmark's --targets, --rank and --experts: what is
benchmarked is what trains. On request:
`--with-reference` adds LiME's plain path (`*_reference`: `LiMELinear.reference_forward`, ẑ and P built at full
width) and `--with-compiled` LiME with every LiMELinear under `torch.compile` (`*_compiled`; `--compile`
compiles every LiME method). On the CPU compiling did not help (training within noise of eager, decoding slower
from guard overhead), so nothing in the library compiles by default.

Timing: `--warmup` untimed steps per method, then `--repeats` rounds; each round times one step of every
method (in a rotated order), so that load from other processes hits all methods alike; the reported number is
the median over rounds. Times are wall-clock by default (`time.perf_counter`, after `torch.cuda.synchronize` on
GPU). On a CPU shared with other work, `--clock cpu --threads 1` times the process's own CPU time instead
(`time.process_time`): a single-threaded process is not charged while other processes hold the cores, so the
numbers measure the work done rather than the machine's load (wall-clock medians under a load average of 5 on
2 cores varied by 2x between identical steps).

The last line printed is one JSON object: the workload, the machine, per-method raw numbers (`methods`), and
the headline ratios (`step_time_ratio_lime_lora_vs_lora`, ...). A ratio whose methods did not run is null.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lime  # noqa: E402
from lime import presets, registry  # noqa: E402
from lime.config import LiMEConfig  # noqa: E402
from lime.inject import matches_target  # noqa: E402


@dataclass(frozen=True)
class Spec:
    """A benchmarked method: a configs/peft preset composed as train.py composes it (its routing group
    included), plus command-line style overrides and how LiME layers run."""

    preset: str
    overrides: tuple[str, ...] = ()
    fused: bool = True  # False: LiME's plain path (`LiMELinear.reference_forward`)
    compile: bool = False  # every LiMELinear under torch.compile
    hf_peft: bool = False  # HF peft's own LoRA (DoRA for preset "dora") with the preset's r, alpha and dropout


# name -> Spec (None: the frozen base, no adapter). Every configs/peft preset is a method under its own name.
METHODS: dict[str, Spec | None] = {
    "base": None,
    **{name: Spec(name) for name in presets.peft_presets()},
    "lime_lora_topk": Spec("lime_lora", ("routing.selection=topk", "routing.top_k=2")),
    "lime_lora_ngram2": Spec("lime_lora", ("routing.n_gram=2",)),
    # LiME's plain path (`LiMELinear.reference_forward`: ẑ and P built at full width), for comparison.
    "lime_lora_reference": Spec("lime_lora", fused=False),
    "lime_dora_reference": Spec("lime_dora", fused=False),
    # LiME with every LiMELinear under torch.compile (as --compile does for all LiME methods).
    "lime_lora_compiled": Spec("lime_lora", compile=True),
    "lime_dora_compiled": Spec("lime_dora", compile=True),
    # Outside anchors: HF peft's own LoRA and DoRA on the same targets with the same r, alpha and dropout.
    "peft_lora": Spec("lora", hf_peft=True),
    "peft_dora": Spec("dora", hf_peft=True),
}
EXTRA = ("_reference", "_compiled")
DEFAULT_METHODS = ["base", "lora", "dora", "peft_lora", "peft_dora", "lime_lora", "lime_lora_topk", "lime_lora_ngram2",
                   "lime_dora", "moe_lora", "moe_dora", "hydralora", "mixlora"]
# --quick: the methods of the headline ratios only
QUICK_METHODS = ["base", "lora", "dora", "peft_lora", "peft_dora", "lime_lora", "lime_lora_ngram2", "lime_dora",
                 "moe_lora", "moe_dora"]
# The paper's backbones' attention projections, (d_in, d_out) (configs/model/llava_ov_{0.5b,7b}.yaml's language
# models: hidden 896 / 3584, 2 / 4 KV heads of 64 / 128 channels); --quick uses small stand-ins.
LAYER_SHAPES = {
    "0.5b": {"q_proj": (896, 896), "k_proj": (896, 128), "v_proj": (896, 128), "o_proj": (896, 896)},
    "7b": {"q_proj": (3584, 3584), "k_proj": (3584, 512), "v_proj": (3584, 512), "o_proj": (3584, 3584)},
}
QUICK_LAYER_SHAPES = {
    "0.5b": {"q_proj": (64, 64), "k_proj": (64, 16), "v_proj": (64, 16), "o_proj": (64, 64)},
    "7b": {"q_proj": (128, 128), "k_proj": (128, 32), "v_proj": (128, 32), "o_proj": (128, 128)},
}
# (ratio key, metric, numerator method, denominator method)
RATIOS = [
    ("step_time_ratio_lime_lora_vs_lora", "step_time_s", "lime_lora", "lora"),
    ("step_time_ratio_lime_lora_vs_moe_lora", "step_time_s", "lime_lora", "moe_lora"),
    ("step_time_ratio_lime_dora_vs_moe_dora", "step_time_s", "lime_dora", "moe_dora"),
    ("step_time_ratio_lime_dora_vs_dora", "step_time_s", "lime_dora", "dora"),
    ("step_time_ratio_lora_vs_base", "step_time_s", "lora", "base"),
    ("peak_memory_ratio_lime_lora_vs_lora", "peak_memory_mb", "lime_lora", "lora"),
    ("peak_memory_ratio_lime_dora_vs_dora", "peak_memory_mb", "lime_dora", "dora"),
    ("peak_memory_ratio_lime_lora_vs_moe_lora", "peak_memory_mb", "lime_lora", "moe_lora"),
    ("decode_tokens_per_s_ratio_lime_lora_vs_lora", "decode_tokens_per_s", "lime_lora", "lora"),
    ("decode_tokens_per_s_ratio_lime_lora_vs_moe_lora", "decode_tokens_per_s", "lime_lora", "moe_lora"),
    ("decode_tokens_per_s_ratio_lime_lora_ngram2_vs_lora", "decode_tokens_per_s", "lime_lora_ngram2", "lora"),
    ("decode_tokens_per_s_ratio_dora_vs_lora", "decode_tokens_per_s", "dora", "lora"),
    ("decode_tokens_per_s_ratio_lime_dora_vs_lora", "decode_tokens_per_s", "lime_dora", "lora"),
    # the outside anchors
    ("step_time_ratio_lime_lora_vs_peft_lora", "step_time_s", "lime_lora", "peft_lora"),
    ("step_time_ratio_lora_vs_peft_lora", "step_time_s", "lora", "peft_lora"),
    ("step_time_ratio_dora_vs_peft_dora", "step_time_s", "dora", "peft_dora"),
    ("decode_tokens_per_s_ratio_lime_lora_vs_peft_lora", "decode_tokens_per_s", "lime_lora", "peft_lora"),
    ("decode_tokens_per_s_ratio_lora_vs_peft_lora", "decode_tokens_per_s", "lora", "peft_lora"),
    ("decode_tokens_per_s_ratio_dora_vs_peft_dora", "decode_tokens_per_s", "dora", "peft_dora"),
    # one layer (q, k, v, o summed) at the paper's shapes
    *[(f"layer_time_ratio_{num}_vs_{den}{suffix}", f"layer_step_time_s{suffix}", num, den)
      for suffix in ("", "_7b")
      for num, den in (("lime_lora", "moe_lora"), ("lime_lora", "lora"), ("lime_dora", "moe_dora"),
                       ("lime_dora", "dora"), ("lora", "peft_lora"), ("dora", "peft_dora"))],
    ("layer_decode_call_time_ratio_lime_lora_vs_lora", "layer_decode_call_s", "lime_lora", "lora"),
    ("layer_decode_call_time_ratio_lime_lora_ngram2_vs_lora", "layer_decode_call_s", "lime_lora_ngram2", "lora"),
    ("layer_decode_call_time_ratio_lime_dora_vs_lora", "layer_decode_call_s", "lime_dora", "lora"),
]
WORKLOAD_KEYS = ("device", "dtype", "hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "seq", "batch",
                 "targets", "rank", "experts", "warmup", "repeats", "layer_repeats", "layer_models", "layer_tokens",
                 "layer_tokens_7b", "layer_repeats_7b", "prompt", "new_tokens", "compile", "clock", "threads", "quick")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
BALANCE = {"importance_weight": 0.1, "kl_weight": 0.01, "scale": 0.01}  # docs/method.md §3 paper values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and few repeats (a smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the frozen model (adapters stay float32, as the configs default)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=8192, help="small, so that the LM head does not dominate")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--methods", default=None,
                   help=f"comma-separated, from {', '.join(METHODS)} (default: all but *_reference, *_compiled, "
                        "with --quick those of the headline ratios)")
    p.add_argument("--with-reference", action="store_true", help="add the *_reference methods (LiME's plain path)")
    p.add_argument("--with-compiled", action="store_true", help="add the *_compiled methods")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps per method (+1 memory step)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (medians are reported)")
    p.add_argument("--prompt", type=int, default=32, help="prefill length of the decoding benchmark")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per timed decoding run")
    p.add_argument("--decode-repeats", type=int, default=None, help="decoding rounds (default: --repeats)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-decode", action="store_true", help="skip the decoding benchmark")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timing (and the memory step)")
    p.add_argument("--no-layer", action="store_true", help="skip the single-layer measurements")
    p.add_argument("--layer-repeats", type=int, default=15, help="interleaved rounds of the single-layer timing")
    p.add_argument("--layer-models", default="0.5b,7b",
                   help=f"projection shapes of these models ({', '.join(LAYER_SHAPES)})")
    p.add_argument("--layer-tokens", type=int, default=None, help="tokens of the layer step (default: batch x seq)")
    p.add_argument("--layer-tokens-7b", type=int, default=None,
                   help="tokens of the layer step at the 7B shapes (default: batch x seq / 4, for the CPU's sake)")
    p.add_argument("--layer-repeats-7b", type=int, default=5, help="interleaved rounds at the 7B shapes")
    p.add_argument("--compile", action="store_true", help="torch.compile the LiME layers' forward")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", default="wall", choices=list(CLOCKS),
                   help="wall: time.perf_counter; cpu: time.process_time (CPU only; use with --threads 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 64, 2, 4, 2, 128
        args.vocab, args.seq, args.batch, args.warmup, args.repeats, args.layer_repeats = 128, 32, 2, 0, 2, 2
        args.prompt, args.new_tokens, args.layer_repeats_7b = 8, 4, 2
        args.threads = args.threads or 1  # tiny ops: a second thread only adds contention
    args.methods = args.methods or ",".join(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    args.layer_tokens = args.layer_tokens or args.batch * args.seq
    args.layer_tokens_7b = args.layer_tokens_7b or max(args.batch, args.batch * args.seq // 4)
    unknown = set(args.layer_models.split(",")) - set(LAYER_SHAPES)
    if unknown:
        p.error(f"--layer-models: unknown {', '.join(sorted(unknown))}; known: {', '.join(LAYER_SHAPES)}")
    return args


def build_base(args: argparse.Namespace) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.seq + args.prompt + args.new_tokens), tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(device=args.device, dtype=getattr(torch, args.dtype))
    model.generation_config.pad_token_id = 0
    return model.eval()


def lime_config(args: argparse.Namespace, spec: Spec) -> LiMEConfig:
    """The preset's config from configs/ (peft and routing groups), with the benchmark's targets, r and E."""
    cfg = presets.compose([f"peft={spec.preset}", *spec.overrides, f"peft.targets=[{args.targets}]",
                           f"peft.rank={args.rank}", f"peft.num_experts={args.experts}"])
    return presets.lime_config(cfg)


def apply_hf_peft(model: nn.Module, args: argparse.Namespace, spec: Spec) -> None:
    """HF peft's own LoRA (DoRA for the "dora" preset) on the benchmark's targets, with the preset's r, alpha and
    dropout, every other tensor frozen: the cost users of LoRA already pay."""
    from peft import LoraConfig, inject_adapter_in_model

    ours = lime_config(args, spec)
    config = LoraConfig(r=ours.rank, lora_alpha=ours.alpha, lora_dropout=ours.dropout, bias="none",
                        target_modules=list(ours.targets), use_dora=ours.variant == "dora")
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One method: its model, optimizer and the closures the benchmark times."""

    def __init__(self, name: str, base: nn.Module, args: argparse.Namespace) -> None:
        self.name, self.args, self.spec = name, args, METHODS[name]
        self.device = torch.device(args.device)
        self.clock = CLOCKS[args.clock]
        self.model = copy.deepcopy(base)
        if self.spec is None:
            for p in self.model.parameters():
                p.requires_grad_(False)
            targets = tuple(args.targets.split(","))
            for name, module in self.model.named_modules():
                if isinstance(module, nn.Linear) and any(matches_target(name, t) for t in targets):
                    module.register_forward_hook(_floor_hook)
        elif self.spec.hf_peft:
            apply_hf_peft(self.model, args, self.spec)
        else:
            config = lime_config(args, self.spec)
            lime.apply_lime(self.model, config)
            for module in self.model.modules():
                if isinstance(module, lime.LiMELinear):
                    module.fused = self.spec.fused
            if args.compile or self.spec.compile:
                compile_lime_layers(self.model)
        self.routed = is_routed(self.spec, args)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4) if self.trainable else None
        g = torch.Generator().manual_seed(args.seed + 1)
        self.ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g).to(self.device)
        self.mask = torch.ones_like(self.ids)
        self.prompt = self.ids[:, : args.prompt]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def train_step(self) -> None:
        self.model.train()
        if self.spec is None:  # the floor: the frozen model's forward and the backward any adapter needs
            self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids).loss.backward()
            return
        loss = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids).loss
        if self.routed:
            loss = loss + lime.balance_loss(self.model, **BALANCE)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def decode(self) -> float:
        """Greedy cached decoding of `--new-tokens` tokens after an untimed prefill; returns the seconds."""
        self.model.eval()
        mask = torch.ones_like(self.prompt)
        out = self.model(input_ids=self.prompt, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        ones = torch.ones_like(token)
        synchronize(self.device)
        start = self.clock()
        for _ in range(self.args.new_tokens):
            mask = torch.cat([mask, ones], dim=1)
            out = self.model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(self.device)
        return self.clock() - start

    def timed_step(self) -> float:
        synchronize(self.device)
        start = self.clock()
        self.train_step()
        synchronize(self.device)
        return self.clock() - start

    def resident_bytes(self) -> int:
        """Bytes of every tensor alive between steps: weights, buffers, optimizer state (grads are None)."""
        storages: dict[int, int] = {}

        def add(t: torch.Tensor) -> None:
            if isinstance(t, torch.Tensor) and t.device.type == self.device.type:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()

        for t in [*self.model.parameters(), *self.model.buffers()]:
            add(t)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for t in state.values():
                    add(t)
        return sum(storages.values())

    def peak_memory(self) -> int:
        """Peak bytes allocated by torch during one training step (see the module docstring)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.train_step()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action

        resident = self.resident_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            self.train_step()
        live = peak = 0
        for _, action, (key, _version), size in prof._memory_profile().timeline:
            if key.device.type != self.device.type:
                continue
            if action == Action.CREATE:
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return resident + peak


def is_routed(spec: Spec | None, args: argparse.Namespace) -> bool:
    """Whether the method has routers (and so balance terms)."""
    return spec is not None and not spec.hf_peft and registry.METHODS[lime_config(args, spec).method].routed


def _floor_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """The frozen base's backward: make the outputs of the lowest target layers (those whose input needs no
    gradient) leaves that need one, so that backward runs down to exactly where an adapter on every target
    would need gradients, and no further."""
    if torch.is_grad_enabled() and not args[0].requires_grad:
        return output.detach().requires_grad_()
    return None


def compile_lime_layers(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, lime.LiMELinear):
            module.compile()


def measure(args: argparse.Namespace, names: list[str], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    base = build_base(args)
    runners: dict[str, Runner] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            runner = Runner(name, base, args)
            for _ in range(0 if args.no_train else args.warmup):
                runner.train_step()
            # The memory step is one more warm-up step as far as timing goes (it is not timed).
            peak = None if args.no_memory or args.no_train else runner.peak_memory()
            if not args.no_decode:
                runner.decode()
        except Exception as error:  # a method that cannot run is reported, not fatal
            log(f"{name}: failed: {type(error).__name__}: {error}")
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        runners[name] = runner
        results[name] = {"trainable_params": runner.num_trainable}
        if peak is not None:
            results[name]["peak_memory_mb"] = peak / 2**20
        log(f"{name}: ready ({runner.num_trainable:,} trainable)")

    order = list(runners)
    steps: dict[str, list[float]] = {n: [] for n in order}
    for round_ in range(0 if args.no_train else args.repeats):
        rotated = order[round_ % len(order):] + order[: round_ % len(order)]
        for name in rotated:
            steps[name].append(runners[name].timed_step())
    decode_repeats = args.repeats if args.decode_repeats is None else args.decode_repeats
    decodes: dict[str, list[float]] = {n: [] for n in order}
    if not args.no_decode:
        for round_ in range(decode_repeats):
            rotated = order[round_ % len(order):] + order[: round_ % len(order)]
            for name in rotated:
                decodes[name].append(runners[name].decode())
    for name in order:
        r = results[name]
        if steps[name]:
            r["step_time_s"] = statistics.median(steps[name])
            r["step_times_s"] = [round(t, 5) for t in steps[name]]
        if decodes[name]:
            r["decode_tokens_per_s"] = args.batch * args.new_tokens / statistics.median(decodes[name])
            r["decode_times_s"] = [round(t, 5) for t in decodes[name]]
        log(f"{name}:" + (f" step {r['step_time_s'] * 1e3:.1f} ms" if "step_time_s" in r else "")
            + (f", decode {r['decode_tokens_per_s']:.1f} tok/s" if "decode_tokens_per_s" in r else "")
            + (f", peak {r['peak_memory_mb']:.1f} MiB" if "peak_memory_mb" in r else ""))
    return results


def projections(shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype) -> dict[str, nn.Linear]:
    """One decoder layer's frozen attention projections (bias on q, k, v as in Qwen2), shared by every method."""
    return {name: nn.Linear(d_in, d_out, bias=name != "o_proj").to(device, dtype).requires_grad_(False)
            for name, (d_in, d_out) in shapes.items()}


class LayerRunner:
    """One method on one decoder layer's four attention projections (q, k, v, o) at a model's shapes.

    Isolates what an adapter costs on top of its frozen Linears, which the whole model's step dilutes: forward +
    backward (+ balance terms for routed layers) of the four projections on `tokens` tokens each (their times
    summed), a decoding call of the four on one new token per sequence through the state kept with the KV cache
    (after an untimed prefill of --prompt tokens; each call is the next position), and the bytes autograd saves
    for the backward (`saved_tensors_hooks`, unique storages).
    """

    def __init__(self, name: str, args: argparse.Namespace, bases: dict[str, nn.Linear], tokens: int) -> None:
        from lime.context import TextContext

        self.spec, self.clock, self.device = METHODS[name], CLOCKS[args.clock], torch.device(args.device)
        dtype = getattr(torch, args.dtype)
        self.decode_calls = 100 if not args.quick else 5
        self.context = TextContext(mask=None)
        self.layers = nn.ModuleDict(bases)  # the frozen Linears themselves (no copy: nothing changes them)
        if self.spec is not None and self.spec.hf_peft:
            apply_hf_peft(self.layers, args, self.spec)
        elif self.spec is not None:
            config = lime_config(args, self.spec)
            build = registry.METHODS[config.method].layer
            self.layers = nn.ModuleDict({n: build(base, config, self.context) for n, base in bases.items()})
            for layer in self.layers.values():
                if isinstance(layer, lime.LiMELinear):
                    layer.fused = self.spec.fused
                    if args.compile or self.spec.compile:
                        layer.compile()
        torch.manual_seed(args.seed)
        with torch.no_grad():  # trained-looking adapters (B = 0 at init would make some work trivially 0)
            for p in self.layers.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.01)
        self.layers.train()
        self.routed = is_routed(self.spec, args)
        g = torch.Generator().manual_seed(args.seed + 2)
        seq = max(1, tokens // args.batch)

        def inputs(length: int, of: str) -> dict[str, Tensor]:
            size = (lambda layer_name: bases[layer_name].in_features if of == "in" else bases[layer_name].out_features)
            return {n: torch.randn(args.batch, length, size(n), generator=g).to(self.device, dtype) for n in bases}

        self.x, self.grad = inputs(seq, "in"), inputs(seq, "out")
        self.prompt = inputs(args.prompt, "in")
        self.token = {n: x[:, :1].clone() for n, x in self.prompt.items()}
        total = args.prompt + self.decode_calls + 1
        full = torch.ones(args.batch, total, dtype=torch.bool, device=self.device)
        self.decode_masks = [full[:, : args.prompt + 1 + i] for i in range(self.decode_calls + 1)]

    def step(self) -> None:
        loss = 0.0
        for name, layer in self.layers.items():
            loss = loss + (layer(self.x[name].detach().requires_grad_()) * self.grad[name]).sum()
        if self.routed:
            loss = loss + lime.balance_loss(self.layers, **BALANCE)
        loss.backward()
        for p in self.layers.parameters():
            p.grad = None

    def timed_step(self) -> float:
        synchronize(self.device)
        start = self.clock()
        self.step()
        synchronize(self.device)
        return self.clock() - start

    @torch.no_grad()
    def timed_decode(self) -> float:
        """Seconds per decoding call of the four projections (eval mode), one new token per sequence, each call
        the next position of one decoding run (LiME: n-gram windows and factors kept with the cache state)."""
        self.layers.eval()
        context = self.context
        context.state = lime.context.CacheState()
        try:
            context.mask = self.decode_masks[0][:, :-1]
            for name, layer in self.layers.items():  # the prefill
                layer(self.prompt[name])
            context.mask = self.decode_masks[0]
            for name, layer in self.layers.items():  # one untimed call: factors built, caches warm
                layer(self.token[name])
            synchronize(self.device)
            start = self.clock()
            for mask in self.decode_masks[1:]:
                context.mask = mask
                for name, layer in self.layers.items():
                    layer(self.token[name])
            synchronize(self.device)
            return (self.clock() - start) / self.decode_calls
        finally:
            self.layers.train()
            context.mask = context.state = None

    def saved_bytes(self) -> int:
        """Bytes of the distinct storages the autograd graph of one training forward holds for the backward.

        Counted while the outputs are alive; storages saved by graph nodes that died with a detached result
        (DoRA's detached row norm) are freed at once and not counted. The inputs and the layers' own tensors
        (weights, adapters) exist anyway and are not counted either.
        """
        from torch.multiprocessing.reductions import StorageWeakRef

        saved: dict[int, tuple[StorageWeakRef, int]] = {}
        inputs = {n: x.detach().requires_grad_() for n, x in self.x.items()}
        resident = {t.untyped_storage().data_ptr()
                    for t in [*inputs.values(), *self.layers.parameters(), *self.layers.buffers()]}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in resident:
                saved[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            return t.detach()  # not `t`: a saved output would then hold its own node (a reference cycle)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = [layer(inputs[n]) for n, layer in self.layers.items()]
        total = sum(size for ref, size in saved.values() if not ref.expired())
        del outputs
        return total


def measure_layers(args: argparse.Namespace, names: list[str], log: Callable[[str], None]) -> dict[str, dict]:
    """Layer-level numbers for every method at each of --layer-models' shapes (see LayerRunner), in interleaved
    rounds; keys carry the suffix `_7b` at the 7B shapes."""
    out: dict[str, dict] = {n: {} for n in names}
    all_shapes = QUICK_LAYER_SHAPES if args.quick else LAYER_SHAPES
    dtype = getattr(torch, args.dtype)
    for model in args.layer_models.split(","):
        suffix = "" if model == "0.5b" else f"_{model}"
        tokens, repeats = (args.layer_tokens, args.layer_repeats) if model == "0.5b" else (
            args.layer_tokens_7b, args.layer_repeats_7b)
        torch.manual_seed(args.seed)
        bases = projections(all_shapes[model], torch.device(args.device), dtype)
        runners: dict[str, LayerRunner] = {}
        for name in names:
            try:
                runner = LayerRunner(name, args, bases, tokens)
                runner.step()
                runners[name] = runner
            except Exception as error:
                log(f"{name} (layer, {model}): failed: {type(error).__name__}: {error}")
        order = list(runners)
        steps: dict[str, list[float]] = {n: [] for n in order}
        decodes: dict[str, list[float]] = {n: [] for n in order}
        for round_ in range(repeats):
            for name in order[round_ % len(order):] + order[: round_ % len(order)]:
                steps[name].append(runners[name].timed_step())
                if not args.no_decode:
                    decodes[name].append(runners[name].timed_decode())
        for name in order:
            out[name][f"layer_step_time_s{suffix}"] = statistics.median(steps[name])
            out[name][f"layer_saved_mb{suffix}"] = runners[name].saved_bytes() / 2**20
            if decodes[name]:
                out[name][f"layer_decode_call_s{suffix}"] = statistics.median(decodes[name])
        log(f"layers at the {model} shapes: done")
    return out


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, metric, num, den in RATIOS:
        a, b = results.get(num, {}).get(metric), results.get(den, {}).get(metric)
        out[key] = round(a / b, 4) if a is not None and b else None
    return out


def machine(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": args.device, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "processor": platform.processor(),
    }
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, StopIteration):
        pass
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


# (result key, column title, unit factor, whether to add a "x LoRA" column)
MODEL_COLUMNS = [("step_time_s", "step (ms)", 1e3, True), ("decode_tokens_per_s", "decode (tok/s)", 1.0, True),
                 ("peak_memory_mb", "peak memory (MiB)", 1.0, True)]
LAYER_COLUMNS = [("layer_step_time_s", "0.5B layer fwd+bwd (ms)", 1e3, True),
                 ("layer_decode_call_s", "0.5B layer decode call (us)", 1e6, True),
                 ("layer_saved_mb", "0.5B saved for backward (MiB)", 1.0, False),
                 ("layer_step_time_s_7b", "7B layer fwd+bwd (ms)", 1e3, True),
                 ("layer_decode_call_s_7b", "7B layer decode call (us)", 1e6, True)]


def table(results: dict[str, dict[str, Any]], columns: list[tuple[str, str, float, bool]], params: bool = True) -> str:
    """A Markdown table of the results, with metrics also as multiples of LoRA's."""
    lora = results.get("lora", {})
    header = ["method"] + [h for _, title, _, ratio in columns for h in (title, "x LoRA")[: 1 + ratio]]
    header += ["trainable params"] * params
    rows = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:80]} |" + " |" * (len(header) - 2))
            continue
        if not any(key in r for key, *_ in columns):
            continue
        cells = [name]
        for key, _, factor, ratio in columns:
            value, reference = r.get(key), lora.get(key)
            cells.append("" if value is None else f"{value * factor:.{3 if key.startswith('layer_saved') else 1}f}")
            if ratio:
                cells.append(f"{value / reference:.3f}" if value is not None and reference else "")
        if params:
            cells.append(f"{r['trainable_params']:,}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu times CPU work; use the default wall clock on a GPU")
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if args.with_reference:
        names += [n for n in METHODS if n.endswith("_reference") and n not in names]
    if args.with_compiled:
        names += [n for n in METHODS if n.endswith("_compiled") and n not in names]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = measure(args, names, log)
    if not args.no_layer:
        for name, numbers in measure_layers(args, names, log).items():
            results.setdefault(name, {}).update(numbers)
    summary = {
        **ratios(results),
        "workload": {k: getattr(args, k) for k in WORKLOAD_KEYS},
        "machine": machine(args),
        "methods": results,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(table(results, MODEL_COLUMNS))
    if not args.no_layer:
        print(table(results, LAYER_COLUMNS, params=False))
    line = json.dumps(summary)
    if args.output:
        Path(args.output).write_text(line + "\n")
    print(line, flush=True)
    return summary


if __name__ == "__main__":
    main()
