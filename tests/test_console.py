"""What a person reads on the console: the run directory, one compact line per logging step, a closing summary,
and no library notice that says nothing to a LiME user."""

import re
import subprocess
import sys

import pytest

from lime import training
from lime.run import run
from tests.test_train import ROOT, SMALL, compose_config


def test_a_logging_step_is_one_compact_line(monkeypatch):
    console = training.ConsoleLog(samples_per_step=16)
    console.last = (20, 10.0)  # the previous line: step 20, 2 s ago
    monkeypatch.setattr(training.time, "perf_counter", lambda: 12.0)
    logs = {"loss": 1.23449, "balance_loss": 0.012, "learning_rate": 3.9e-4, "grad_norm": 0.5, "epoch": 0.4,
            "routing/usage": [0.25, 0.25, 0.25, 0.25]}
    assert console.line(40, 600, logs) == "step 40/600 | loss 1.2345 | balance 0.012 | lr 3.9e-04 | 160.0 samples/s"
    assert console.last == (40, 12.0)
    assert console.line(40, 600, {"loss": 2.0}) == "step 40/600 | loss 2.0000"  # no time since: no speed


@pytest.mark.slow
def test_a_run_prints_its_directory_compact_step_lines_and_a_summary(tmp_path, capsys):
    run(compose_config(*SMALL, "trainer.progress_bar=true", "trainer.evaluate=false"), tmp_path)
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"run directory: {tmp_path}"
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 4
    for number, line in enumerate(steps, 1):
        assert re.fullmatch(rf"step {number}/4 \| loss \d+\.\d{{4}} \| balance \S+ \| lr \d\.\de[-+]\d\d"
                            r" \| \d+\.\d samples/s", line), line
    assert "{'loss'" not in captured.out + captured.err and "train_runtime" not in captured.out + captured.err
    assert re.fullmatch(rf"completed in \d+ s \| train loss \d+\.\d{{4}} \| run directory: {re.escape(str(tmp_path))}",
                        lines[-1]), lines[-1]


def test_importing_lime_prints_no_bitsandbytes_kernels_notice():
    """bitsandbytes, imported by peft, logs on import that its optional `kernels` package is missing."""
    done = subprocess.run([sys.executable, "-c", "import lime.run"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "kernels" not in done.stdout + done.stderr, done.stderr
