"""Figure 2's numbers from run directories: per-method means of the efficiency fields, and ratios to a reference.

Matplotlib-free: lime.report.efficiency_plots draws them, lime.report.tables.write_efficiency_table writes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lime.report import paper as paper_numbers
from lime.report.runs import Run
from lime.report.tables import Stat

# run_info field -> (label with unit, value transform, the paper's Figure 2 key)
EFFICIENCY_FIELDS = {
    "train_time": ("training time (min)", lambda i: i.get("train_time_s", math.nan) / 60, "train_time_min"),
    "throughput": ("throughput (samples/s)", lambda i: i.get("train_samples_per_s"), "throughput"),
    # A training-only peak (train_peak_memory_bytes) is preferred when logged: peak_memory_bytes spans evaluation too.
    "memory": ("peak memory (GiB)",
               lambda i: i.get("train_peak_memory_bytes", i.get("peak_memory_bytes", math.nan)) / 2**30,
               "peak_memory_gb"),
    "trainable": ("trainable parameters (M)", lambda i: i.get("trainable_params", math.nan) / 1e6,
                  "trainable_params_m"),
    "total": ("total parameters (M)", lambda i: i.get("total_params", math.nan) / 1e6, "total_params_m"),
}


def efficiency_stats(runs: Sequence[Run]) -> dict[str, dict[str, Stat]]:
    """{peft name: {field: Stat over seeds}} in the paper's method order."""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    order = paper_numbers.method_order()
    methods = sorted(by_method, key=lambda m: (order.index(m) if m in order else len(order), m))
    return {m: {f: Stat.of([spec[1](r.info) for r in by_method[m]]) for f, spec in EFFICIENCY_FIELDS.items()}
            for m in methods}


def memory_label(runs: Sequence[Run]) -> str:
    """What the runs' peak memory is (run_info's `peak_memory`): the GPU allocator's, or the CPU process's."""
    kinds = sorted({str(r.info.get("peak_memory") or ("GPU" if "cpu" not in str(r.info.get("device")) else "CPU"))
                    for r in runs})
    return "; ".join(kinds)


def same_model_as_paper(runs: Sequence[Run], data: dict | None) -> bool:
    """Figure 2's absolute values belong beside runs of its model only (a tiny model's minutes are not)."""
    return {r.info.get("model") for r in runs} == {(data or paper_numbers.load())["figure2"]["model"]}


def paper_value(method: str, field: str, data: dict | None) -> float | None:
    row = paper_numbers.efficiency_row(method, data)
    return None if row is None else row.get(EFFICIENCY_FIELDS[field][2])


# The paper's headline efficiency comparison is against MoEDoRA (LiME-DoRA: 29 % less training time).
RELATIVE_TO = ("moe_dora", "moe_lora")
RELATIVE_FIELDS = ("train_time", "throughput", "memory", "trainable")


def relative_efficiency(stats: dict[str, dict[str, Stat]], paper_data: dict | None = None,
                        ) -> tuple[str | None, dict[str, dict[str, float | None]], dict[str, dict[str, float | None]]]:
    """(reference method, ours, the paper's): each method's RELATIVE_FIELDS divided by the reference's (the
    first of RELATIVE_TO that both have). Ratios are comparable across models and devices; minutes are not."""
    reference = next((m for m in RELATIVE_TO if m in stats and paper_value(m, "train_time", paper_data)), None)
    if reference is None:
        return None, {}, {}

    def ratio(value: float | None, base: float | None) -> float | None:
        return value / base if value is not None and base else None

    ours = {m: {f: ratio(stats[m][f].mean, stats[reference][f].mean) for f in RELATIVE_FIELDS} for m in stats}
    paper = {m: {f: ratio(paper_value(m, f, paper_data), paper_value(reference, f, paper_data))
                 for f in RELATIVE_FIELDS} for m in stats}
    return reference, ours, paper
