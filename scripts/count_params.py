"""Trainable and total parameters of a method on a model, on the meta device (no weights, no downloads).

    python scripts/count_params.py model=llava_ov_7b peft=lime_lora     # one method
    python scripts/count_params.py model=llava_ov_7b                    # every peft config: the #params column
    python scripts/count_params.py model=llava_ov_0.5b experiment=efficiency

Each count is also computed from the per-layer formulas the methods and variants registered (lime.registry):
`formula` (null for prompt tuning, which wraps no Linear); a difference is reported on stderr.
The last line printed is one JSON object: {"trainable", "total", ...} for one method, or {"methods": [...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lime, as scripts/bench.py

import lime  # noqa: E402
from lime import models, presets, registry  # noqa: E402
from lime.inject import lime_modules  # noqa: E402


def formula_count(model, config: lime.LiMEConfig) -> int | None:
    """Σ over the wrapped layers of the registered per-layer formula (None when no Linear is wrapped)."""
    if registry.VARIANTS[config.variant].build is None:
        return None
    return sum(registry.layer_params(m.in_features, m.out_features, config) for _, m in lime_modules(model))


def count(cfg: DictConfig) -> dict:
    """Build `cfg.model` on the meta device, apply `cfg.peft` + `cfg.routing`, count."""
    model, _ = models.build(cfg.model, device="meta")
    base_total = sum(p.numel() for p in model.parameters())
    config = presets.lime_config(cfg)
    lime.apply_lime(model, config)
    result = {
        "model": cfg.model.name, "method": cfg.peft.name, "trainable": lime.trainable_parameters(model),
        "total": sum(p.numel() for p in model.parameters()), "base_total": base_total,
        "formula": formula_count(model, config),
    }
    if result["formula"] not in (None, result["trainable"]):
        print(f"{result['method']}: {result['trainable']:,} trainable, but the registered formulas give "
              f"{result['formula']:,}", file=sys.stderr)
    return result


def main(argv: list[str]) -> dict:
    if any(arg.startswith("peft=") for arg in argv):
        result = count(presets.compose(argv))
        print(f"{result['method']} on {result['model']}: trainable {result['trainable']:,}, total {result['total']:,}")
        return result
    rows = []
    for name in presets.peft_presets():
        row = count(presets.compose([*argv, f"peft={name}"]))
        print(f"{row['method']:16s} {row['trainable']:>12,}  ({row['trainable'] / 1e6:.2f}M)  total {row['total']:,}")
        rows.append(row)
    return {"model": rows[0]["model"] if rows else None, "methods": rows}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
