"""scripts/bench.py and scripts/gpu_check.sh run end to end and report what the performance targets read."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The ratios the performance targets are stated in (README "Performance").
HEADLINE_RATIOS = (
    "step_time_ratio_lime_lora_vs_lora", "step_time_ratio_lime_lora_vs_moe_lora",
    "step_time_ratio_lime_dora_vs_moe_dora", "peak_memory_ratio_lime_lora_vs_lora",
    "decode_tokens_per_s_ratio_lime_lora_vs_lora", "decode_tokens_per_s_ratio_lime_lora_ngram2_vs_lora",
    "decode_tokens_per_s_ratio_dora_vs_lora", "decode_tokens_per_s_ratio_lime_dora_vs_lora",
    "layer_decode_call_time_ratio_lime_lora_vs_lora",
    "step_time_ratio_lime_lora_vs_peft_lora", "decode_tokens_per_s_ratio_lime_lora_vs_peft_lora",
    "step_time_ratio_lora_vs_peft_lora", "step_time_ratio_dora_vs_peft_dora",
    *[f"layer_time_ratio_{pair}{suffix}" for suffix in ("", "_7b")
      for pair in ("lime_lora_vs_moe_lora", "lime_lora_vs_lora", "lime_dora_vs_moe_dora")],
)


@pytest.mark.slow
def test_bench_quick_runs_and_reports_json():
    """`scripts/bench.py --quick` runs end to end; its last line is the JSON summary (no timing assertions)."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in HEADLINE_RATIOS:
        assert isinstance(summary[key], float) and summary[key] > 0, key
    methods = summary["methods"]
    for name in ("base", "lora", "dora", "peft_lora", "peft_dora", "lime_lora", "lime_dora", "moe_lora", "moe_dora"):
        method = methods[name]
        assert method["step_time_s"] > 0 and method["peak_memory_mb"] > 0, name
        assert "decode_tokens_per_s" in method, name
        for suffix in ("", "_7b"):
            assert method[f"layer_step_time_s{suffix}"] > 0 and method[f"layer_decode_call_s{suffix}"] > 0, name
    assert methods["lime_lora"]["trainable_params"] > methods["lora"]["trainable_params"]
    # HF peft's LoRA/DoRA train exactly as many tensors as ours (same r on the same targets)
    assert methods["peft_lora"]["trainable_params"] == methods["lora"]["trainable_params"]
    assert methods["peft_dora"]["trainable_params"] == methods["dora"]["trainable_params"]
    assert not any("error" in method for method in methods.values())


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step(tmp_path):
    """`scripts/gpu_check.sh --dry-run` runs every step of the GPU check on the CPU at tiny sizes and writes one
    JSON file: the benchmark's ratios, a finite training step and generation of the 0.5B architecture (tiny
    towers) with LiME, fused AdamW equal to the default, and the bitsandbytes steps skipped with their reason."""
    output = tmp_path / "gpu_check.json"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--output", str(output)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["ok"] and report["dry_run"]
    assert isinstance(report["bench"]["layer_time_ratio_lime_lora_vs_lora"], float)
    model = report["model"]
    assert model["finite"] and model["params_with_grad"] > 0 and model["generated_tokens"] == 4
    assert 0 < model["trainable_params"] < model["params"]
    assert report["fused_adamw"]["max_abs_difference"] <= 1e-5
    for mode in ("bnb_8bit", "bnb_4bit"):
        assert "CUDA" in report[mode]["skipped"], mode
