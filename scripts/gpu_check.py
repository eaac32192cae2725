"""The GPU check behind scripts/gpu_check.sh: one command, a few minutes on one GPU, one JSON file.

    bash scripts/gpu_check.sh                      # on a CUDA machine: gpu_check.json
    bash scripts/gpu_check.sh --dry-run            # the same steps on the CPU at tiny sizes (a test runs this)

Steps (each recorded under its name in the JSON file; a step that fails records its error and the others run):

* `bench`: scripts/bench.py in bf16 at the LLaVA-OV-0.5B shapes (whole model: the 0.5B language model's
  hidden 896, 14 heads, 2 KV heads, MLP 4864, 24 layers; layers: q/o 896→896, k/v 896→128), its final JSON.
* `model`: the whole LLaVA-OV-0.5B architecture built from configs/model/llava_ov_0.5b.yaml's `architecture`
  (random weights, nothing downloaded) in bf16 with LiME-LoRA on its targets: a training step (forward,
  backward with the balance loss, fused AdamW) on text tokens, then cached greedy generation; times, peak memory.
* `bnb_8bit`, `bnb_4bit`: the same model saved with random weights and reloaded through bitsandbytes 8-bit / 4-bit
  (as `model.quantization` loads it), LiME-LoRA on top: forward, backward, generate.
* `fused_adamw`: `torch.optim.AdamW(fused=True)` against the default implementation on LiME's parameters after
  the same gradients: the largest difference of the updated tensors.

`--dry-run` runs every step on the CPU at tiny sizes (the bitsandbytes steps are skipped with the reason).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lime  # noqa: E402
from lime import presets  # noqa: E402
from lime.models import FAMILIES, config_from_architecture  # noqa: E402
from lime.settings import plain  # noqa: E402

MODEL = "llava_ov_0.5b"
BALANCE = {"importance_weight": 0.1, "kl_weight": 0.01, "scale": 0.01}  # docs/method.md, "Balance losses"
# --dry-run: the 0.5B architecture with tiny towers (the vocabulary stays: the image token ids live at its end)
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    p.add_argument("--output", default="gpu_check.json")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    args.dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        args.batch, args.seq, args.new_tokens = 2, 16, 4
    elif not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    return args


def bench_args(args: argparse.Namespace) -> list[str]:
    if args.dry_run:
        return ["--quick", "--methods", "lora,lime_lora", "--layer-models", "0.5b"]
    return ["--device", "cuda", "--dtype", "bfloat16", "--hidden", "896", "--heads", "14", "--kv-heads", "2",
            "--intermediate", "4864", "--layers", "24", "--vocab", "8192", "--batch", str(args.batch),
            "--seq", str(args.seq), "--layer-models", "0.5b", "--repeats", "5", "--layer-repeats", "10"]


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    return bench.main(bench_args(args))


def architecture(args: argparse.Namespace) -> nn.Module:
    """The LLaVA-OV-0.5B model of configs/model, random weights (tiny towers under --dry-run)."""
    cfg = presets.compose([f"model={MODEL}"]).model
    arch = plain(cfg.architecture)
    if args.dry_run:
        arch["text_config"] = {**arch["text_config"], **TINY_TEXT}
        arch["vision_config"] = {**arch["vision_config"], **TINY_VISION}
    config = config_from_architecture(cfg.family, arch)
    torch.manual_seed(0)
    model = FAMILIES[cfg.family][1]._from_config(config, dtype=args.dtype)
    model.generation_config.pad_token_id = 0
    return model


def lime_config() -> lime.LiMEConfig:
    return presets.lime_config(presets.compose([f"model={MODEL}", "peft=lime_lora"]))


def sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def exercise(model: nn.Module, args: argparse.Namespace, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """A training step (forward, backward with the balance loss, optimizer step) and cached greedy generation."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    ids = torch.randint(1, 1000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    sync(args)
    start = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    total = loss + lime.balance_loss(model, **BALANCE)
    total.backward()
    grads = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(args)
    step_s = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    prompt = min(32, args.seq)
    with torch.no_grad():
        out = model.generate(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False)
    sync(args)
    generate_s = time.perf_counter() - start
    result = {"loss": float(loss.detach()), "finite": bool(torch.isfinite(total)), "params_with_grad": len(grads),
              "step_s": round(step_s, 4), "generated_tokens": int(out.shape[1] - prompt),
              "generate_tokens_per_s": round(args.batch * args.new_tokens / generate_s, 1)}
    if args.device == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if not result["finite"] or result["params_with_grad"] == 0 or result["generated_tokens"] != args.new_tokens:
        raise RuntimeError(f"the step or generation went wrong: {result}")
    return result


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    model = architecture(args).to(args.device)
    lime.apply_lime(model, lime_config())
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    result = exercise(model, args, optimizer)
    result["trainable_params"] = sum(p.numel() for p in trainable)
    result["params"] = sum(p.numel() for p in model.parameters())
    return result


def run_bnb(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    if args.dry_run:
        return {"skipped": "bitsandbytes quantizes on a CUDA device only (--dry-run runs on the CPU)"}
    cfg = presets.compose([f"model={MODEL}", f"model.quantization={mode}"]).model
    with tempfile.TemporaryDirectory() as folder:
        architecture(args).save_pretrained(folder)
        model = FAMILIES[cfg.family][1].from_pretrained(
            folder, dtype=args.dtype, quantization_config=lime.models._quantization_config(dict(cfg)),
            device_map={"": 0})
    model.generation_config.pad_token_id = 0
    lime.apply_lime(model, lime_config())
    return {**exercise(model, args, None), "quantization": mode}


def run_fused_adamw(args: argparse.Namespace) -> dict[str, Any]:
    """Fused AdamW and the default one take the same steps from the same gradients on LiME's tensors."""
    torch.manual_seed(0)
    layer = lime.LiMELinear(nn.Linear(256, 256).to(args.device), lime_config()).to(args.device)
    params = [p for p in layer.parameters() if p.requires_grad]
    fused = [p.detach().clone().requires_grad_() for p in params]
    optimizers = (torch.optim.AdamW(params, lr=1e-3), torch.optim.AdamW(fused, lr=1e-3, fused=True))
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(params, fused, strict=True):
            a.grad = torch.randn(a.shape, generator=g).to(a.device)
            b.grad = a.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    difference = max(float((a - b).abs().max()) for a, b in zip(params, fused, strict=True))
    if difference > 1e-5:
        raise RuntimeError(f"fused AdamW differs from the default by {difference}")
    return {"max_abs_difference": difference, "tensors": len(params)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "bench": lambda: run_bench(args),
        "model": lambda: run_model(args),
        "bnb_8bit": lambda: run_bnb(args, "8bit"),
        "bnb_4bit": lambda: run_bnb(args, "4bit"),
        "fused_adamw": lambda: run_fused_adamw(args),
    }
    report: dict[str, Any] = {"dry_run": args.dry_run, "device": args.device, "dtype": str(args.dtype),
                              "torch": torch.__version__, "python": platform.python_version()}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    for name, step in steps.items():
        start = time.perf_counter()
        try:
            report[name] = step()
        except Exception as error:  # recorded; the other steps still run
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        report[name]["wall_s"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {'failed' if 'error' in report[name] else 'ok'} ({report[name]['wall_s']} s)",
              file=sys.stderr, flush=True)
    report["ok"] = not any(isinstance(v, dict) and "error" in v for v in report.values())
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
