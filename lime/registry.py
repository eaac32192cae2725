"""The registries of shared PEFT variants and of layer methods: one registration line makes a new one usable.

A *variant* (`peft.variant`) is the shared PEFT module that produces ẑ (lime/adapters/, one file each); a
*method* (`peft.method`) is the layer family that wraps one frozen Linear with it: `lime` (docs/method.md,
"The LiME layer"), `plain` (the PEFT module alone) and the MoE-PEFT baselines of lime/moe.py. Config
validation (lime.config), injection (lime.inject), scripts/count_params.py, scripts/bench.py and the
per-method test suite (tests/test_methods.py) read these dicts, so a registered entry is validated, built,
counted, benchmarked and tested with no other edit. As HF peft's `register_peft_method`, a name is registered
once; the entries register themselves where they are defined (lime/adapters/__init__.py, lime/layer.py,
lime/moe.py).

Each entry also states its trainable parameters per wrapped d_in x d_out layer (`params`), the formula of
docs/method.md, "Parameter counts"; the suite checks every wrapped model against it, exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from lime.config import LiMEConfig
    from lime.context import TextContext

# (base Linear, config) -> the shared PEFT module (an `Adapter`)
AdapterBuilder = Callable[["nn.Linear", "LiMEConfig"], "nn.Module"]
# (base Linear, config, the language model's text context or None) -> the wrapped layer
LayerBuilder = Callable[["nn.Linear", "LiMEConfig", "TextContext | None"], "nn.Module"]
# (d_in, d_out, config) -> trainable parameters of one wrapped layer
ParamCount = Callable[[int, int, "LiMEConfig"], int]
# (dotted name, Linear, config) -> what is wrong with wrapping this Linear, or None
LinearCheck = Callable[[str, "nn.Linear", "LiMEConfig"], "str | None"]


@dataclass(frozen=True)
class Variant:
    """A shared PEFT module (`peft.variant`)."""

    name: str
    build: AdapterBuilder | None  # None: wraps no Linear (prompt tuning wraps the language model's input)
    params: ParamCount | None  # trainable parameters of the module on one Linear (None with build=None)
    check: LinearCheck | None = None  # model-dependent checks (lime.inject.validate), e.g. SliceFine's slice


@dataclass(frozen=True)
class Method:
    """A layer family (`peft.method`) that wraps each target Linear."""

    name: str
    layer: LayerBuilder
    params: Callable[[int, int, LiMEConfig, Variant], int]  # per wrapped layer, given its shared variant
    variants: tuple[str, ...] | None = None  # the variants it is defined for (None: every registered one)
    routed: bool = True  # per-token routing: balance losses apply, num_experts <= d_out
    router: str | None = None  # the routing.router it requires (None: any)
    routing_group: str = "zero_param"  # the configs/routing/ file its configs/peft files select


VARIANTS: dict[str, Variant] = {}
METHODS: dict[str, Method] = {}


def _register(table: dict, entry: Variant | Method) -> None:
    if entry.name in table:
        raise ValueError(f"{type(entry).__name__.lower()} {entry.name!r} is already registered")
    table[entry.name] = entry


def register_variant(name: str, build: AdapterBuilder | None, params: ParamCount | None, *,
                     check: LinearCheck | None = None) -> Variant:
    """Make `peft.variant=<name>` available to every method that allows it."""
    entry = Variant(name, build, params, check)
    _register(VARIANTS, entry)
    return entry


def register_method(name: str, layer: LayerBuilder, params: Callable, **options) -> Method:
    """Make `peft.method=<name>` available; `options` are the other fields of `Method`."""
    entry = Method(name, layer, params, **options)
    _register(METHODS, entry)
    return entry


def unregister(name: str) -> None:
    """Remove a method or variant of that name (tests that register toys clean up with it)."""
    METHODS.pop(name, None)
    VARIANTS.pop(name, None)


def allowed_variants(method: Method) -> tuple[str, ...]:
    return tuple(VARIANTS) if method.variants is None else method.variants


def cases() -> list[tuple[str, str]]:
    """Every registered (method, variant) pair: what the per-method test suite runs."""
    return [(m.name, v) for m in METHODS.values() for v in allowed_variants(m) if v in VARIANTS]


def layer_params(d_in: int, d_out: int, config: LiMEConfig) -> int:
    """Trainable parameters of one wrapped d_in x d_out layer under `config`, from the registered formulas."""
    return METHODS[config.method].params(d_in, d_out, config, VARIANTS[config.variant])


__all__ = [
    "METHODS", "VARIANTS", "Method", "Variant", "allowed_variants", "cases", "layer_params", "register_method",
    "register_variant", "unregister",
]
