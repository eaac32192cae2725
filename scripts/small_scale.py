"""Every paper experiment at small scale (the tiny LLaVA-OneVision on mmt_mini, CPU), then its tables and figures,
regenerated from the committed runs, into experiments/<experiment>/small_scale/.

    python scripts/small_scale.py                                  # all of them, two jobs at a time (~5 h on 2 cores)
    python scripts/small_scale.py ablation_ngram table2 --jobs 4   # some of them
    python scripts/small_scale.py --report-only                    # rebuild the reports from the runs already there
    python scripts/small_scale.py --check experiments/table2/small_scale/runs/seed0/peft=lime_lora
                                                                   # rerun one committed job from empty caches

An experiment is the paper's sweep (configs/experiment/<name>.yaml, expanded as Hydra's basic sweeper expands it)
with the small-scale groups on the command line, which win over the experiment's. Every job is one `train.py`
process whose run directory is experiments/<experiment>/small_scale/runs/seed<S>/<its overrides>, committed with
the reports. Resumable: a job whose run completed is skipped, one that did not is started afresh (so that a
rerun's numbers never depend on where an earlier one stopped); a full rerun can span sessions. A completed run
is compacted for the repository: checkpoints dropped, predictions gzipped, and the backbone's own per-sample
verdicts copied beside it (backbone_eval/, for the backbone-alone row's intervals). A completed run started with
other overrides (e.g. another --epochs) is never taken for this job's: the job fails, naming it. The timed experiment
(efficiency) runs after the others, alone on the machine. A failed job is reported and left out of the reports;
the others go on. With table2 or ablation_ngram, the representation analyses (experiments/analysis) are rebuilt
from two of their committed runs.

--check reruns one committed run from empty caches (benchmark, pretraining mixture and backbone rebuilt in a
temporary directory, as on a fresh machine) and compares its results.json (every score, count and answer loss)
and its adapter's tensor checksums with the committed ones, exactly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = [  # in the order they run: Table 2, the sweeps from the shortest, then the timed one, alone
    "table2", "ablation_ngram", "ablation_router", "ablation_shared", "ablation_layers", "ablation_targets",
    "ablation_channels", "ablation_balance", "ablation_init", "ablation_temperature", "ablation_topk",
    "ablation_gamma", "ablation_experts", "efficiency",
]
TIMED = {"efficiency"}  # run alone: other jobs on the machine would be in its times
SMALL = ["model=tiny_llava_ov", "data=mmt_mini", "trainer=smoke", "trainer.progress_bar=false"]
# Where the tiny model cannot take the paper's value: it has 2 language-model blocks, not 24.
TINY_SWEEPS = {"ablation_layers": ["peft.layer_indices=[1],null"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", metavar="NAME",
                        help=f"experiments to run (default: all): {', '.join(EXPERIMENTS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments",
                        help="runs and reports: <out>/<name>/small_scale/{runs/,tables,figures}")
    parser.add_argument("--jobs", type=int, default=2, help="train.py processes at a time (one CPU thread each)")
    parser.add_argument("--epochs", type=int, default=1, help="trainer.epochs (trainer=smoke: 1)")
    parser.add_argument("--table2-seeds", default="0,1,2")
    parser.add_argument("--ablation-seeds", default="0,1,2")
    parser.add_argument("--report-only", action="store_true", help="skip training; rebuild the reports")
    parser.add_argument("--check", type=Path, metavar="RUN_DIR", help="rerun this committed run and compare")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiments {unknown}; choose from {EXPERIMENTS}")
    args.experiments = args.experiments or EXPERIMENTS
    if args.check and not (args.check / "results.json").is_file():
        parser.error(f"--check: {args.check} is not a completed run directory (no results.json)")
    return args


def seeds(experiment: str, args: argparse.Namespace) -> list[str]:
    if experiment == "efficiency":
        return ["0"]  # timing; the paper reports one run per method
    return (args.table2_seeds if experiment == "table2" else args.ablation_seeds).split(",")


@dataclass(frozen=True)
class Job:
    """One point of an experiment's sweep: `overrides` are the swept values, seed included."""

    experiment: str
    overrides: tuple[str, ...]

    @property
    def seed(self) -> str:
        return next(o.split("=", 1)[1] for o in self.overrides if o.startswith("seed="))

    @property
    def name(self) -> str:
        """The run directory's name: its swept values less the seed, e.g. `peft=lime_lora`."""
        return ",".join(o for o in self.overrides if not o.startswith("seed=")).replace("/", "|")

    def run_dir(self, out: Path) -> Path:
        return runs_root(self.experiment, out) / f"seed{self.seed}" / self.name

    def train_overrides(self, args: argparse.Namespace) -> list[str]:
        """What `train.py` is given (less the run directory), as its run records them in .hydra/overrides.yaml."""
        return [f"experiment={self.experiment}", *SMALL, f"trainer.epochs={args.epochs}", *self.overrides]

    def command(self, args: argparse.Namespace) -> list[str]:
        run_dir = f"hydra.run.dir='{self.run_dir(args.out)}'"  # quoted: the name holds = [ ,
        return [sys.executable, str(ROOT / "train.py"), *self.train_overrides(args), run_dir]


def runs_root(experiment: str, out: Path) -> Path:
    return out / experiment / "small_scale" / "runs"


def jobs(experiment: str, args: argparse.Namespace) -> list[Job]:
    """The experiment's sweep at small scale, in the order `train.py -m` would run it."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = compose_small(f"experiment={experiment}", hydra=True)["hydra"]["sweeper"]["params"] or {}
    # The command line wins over the experiment's params on a shared key, as in BasicSweeper.
    arguments = [*(f"{k}={v}" for k, v in params.items()), *TINY_SWEEPS.get(experiment, []),
                 f"seed={','.join(seeds(experiment, args))}"]
    parsed = OverridesParser.create().parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [Job(experiment, tuple(overrides)) for batch in batches for overrides in batch]


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run_info.json").read_text()).get("status") == "completed"
    except (OSError, json.JSONDecodeError):
        return False


def completed_runs(experiment: str, out: Path = ROOT / "experiments") -> list[Path]:
    """The completed run directories of an experiment under <out>/<experiment>/small_scale/runs."""
    return sorted(path.parent for path in runs_root(experiment, out).glob("seed*/*/run_info.json")
                  if completed(path.parent))


def compact(run_dir: Path) -> None:
    """What the repository keeps of a completed run (idempotent): no checkpoints (the adapter is beside them),
    gzipped predictions, per-layer routing statistics from the last logging step only (the figures read no
    other), and the backbone's own per-sample verdicts for the backbone-alone row's intervals."""
    from lime.pretrain import baseline_dir
    from lime.report.runs import load_run
    from lime.results import compress_predictions, prediction_files, prediction_split, read_predictions

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    compress_predictions(run_dir / "predictions")
    thin_metrics(run_dir / "metrics.jsonl")
    if not (run_dir / "backbone_results.json").is_file():
        return
    target = run_dir / "backbone_eval" / "predictions"
    if target.is_dir():
        source = target  # already copied (by this version: verdicts only; or by an earlier one: whole rows)
    else:
        cfg = load_run(run_dir).config
        source = baseline_dir(cfg["model"], cfg["data"]) / "backbone_eval" / "predictions"
        target.mkdir(parents=True)
    for path in prediction_files(source):
        verdicts = [{"id": row["id"], "correct": row["correct"]} for row in read_predictions(path)]
        if source == target:
            path.unlink()
        (target / f"{prediction_split(path)}.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts))
    compress_predictions(target)


def thin_metrics(path: Path) -> None:
    """Drop the per-layer routing statistics (routing/layers/...) of every logging step but the last that has
    them: they are most of the file, and the reports read only the latest."""
    if not path.is_file():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    layered = [i for i, row in enumerate(rows) if any(k.startswith("routing/layers/") for k in row)]
    for i in layered[:-1]:
        rows[i] = {k: v for k, v in rows[i].items() if not k.startswith("routing/layers/")}
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def start_afresh(run_dir: Path) -> None:
    """Clear what an interrupted run left, unless its process still runs (the run's lock then refuses)."""
    from lime.run import RunLock

    with RunLock(run_dir):
        for path in run_dir.iterdir():
            if path.name.startswith(".lock"):
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def run(job: Job, args: argparse.Namespace) -> bool:
    run_dir = job.run_dir(args.out)
    label = f"{job.experiment} seed {job.seed} {job.name}"
    if completed(run_dir):
        import yaml

        recorded = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        if recorded != job.train_overrides(args):
            print(f"FAILED {label}: {run_dir} holds a completed run of other overrides ({' '.join(recorded)}); "
                  "choose another --out, or delete that directory to rerun it", flush=True)
            return False
        compact(run_dir)  # a no-op unless an earlier version of this script left it less compact
        return True
    if run_dir.exists():
        start_afresh(run_dir)
    log = run_dir.parent / f"{job.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        ok = subprocess.run(job.command(args), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode == 0
    if ok:
        compact(run_dir)
        log.unlink()  # the run directory's train.log has it
    print(f"{'done  ' if ok else 'FAILED'} {label} in {time.perf_counter() - start:.0f}s"
          + ("" if ok else f" (see {log})"), flush=True)
    return ok


def check(args: argparse.Namespace) -> int:
    """Rerun one committed run from empty caches; 0 when its results.json and adapter checksums are reproduced
    exactly."""
    import yaml

    committed = args.check
    overrides = yaml.safe_load((committed / ".hydra" / "overrides.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="lime-check-") as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"data.cache_dir={tmp}/data",
               f"model.pretrain.cache_dir={tmp}/backbones", f"hydra.run.dir={tmp}/run"]
        print(" ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode:
            return 1
        wrong = mismatches(committed, Path(tmp) / "run")
    print("\n".join(wrong) if wrong else f"reproduced exactly: {committed}")
    return 1 if wrong else 0


def mismatches(committed: Path, rerun: Path) -> list[str]:
    """Every value of results.json (scores, counts, answer losses) and every adapter tensor checksum in which a
    rerun differs from the committed run; floats compared exactly."""
    out = []
    for name, key in (("results.json", None), ("adapter/adapter_config.json", "tensors")):
        ours, theirs = (json.loads((root / name).read_text()) for root in (committed, rerun))
        ours, theirs = (flat(d.get(key, {}) if key else d) for d in (ours, theirs))
        out += [f"{name} {k}: committed {ours.get(k, '(absent)')!r}, rerun {theirs.get(k, '(absent)')!r}"
                for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)]
    return out


def flat(value, prefix: str = "") -> dict[str, object]:
    """{'a.b.0': leaf} of a JSON value."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def pretrain_backbone() -> None:
    """Pretrain (or find cached) the tiny backbone once, before parallel jobs would each pretrain it."""
    from omegaconf import OmegaConf

    from lime.pretrain import ensure_backbone

    cfg = OmegaConf.to_container(OmegaConf.create(compose_small()), resolve=True)
    ensure_backbone(cfg["model"], cfg["data"])


# Swept config groups and the key that holds their choice in the composed config.
GROUP_KEYS = {"peft": "peft.name", "selection": "routing.selection"}


def compose_small(*overrides: str, hydra: bool = False) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=[*SMALL[:3], *overrides], return_hydra_config=hydra)
    return OmegaConf.to_container(cfg, resolve=False)


def reference(experiment: str) -> list[str]:
    """The row the tables' Δ column compares against: LoRA in Table 2, else the default setting (the composed
    config's value) of every key the ablation sweeps."""
    if experiment == "table2":
        return ["peft.name=lora"]
    from omegaconf import OmegaConf

    cfg = compose_small(f"experiment={experiment}", hydra=True)
    out = []
    for key in cfg["hydra"]["sweeper"]["params"]:
        key = GROUP_KEYS.get(key.lstrip("+~"), key.lstrip("+~"))
        if key != "seed":
            value = OmegaConf.select(OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"}), key)
            out.append(f"{key}={json.dumps(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)}")
    return out


# Table 2's claims about LiME: each LiME method against the PEFT method it modulates, and against the MoE
# baseline of the same PEFT (docs/method.md §7).
TABLE2_PAIRS = [("lime_lora", "lora"), ("lime_dora", "dora"), ("lime_lora_fa", "lora_fa"),
                ("lime_slicefine", "slicefine"), ("lime_prompt", "prompt"), ("lime_lora", "moe_lora"),
                ("lime_dora", "moe_dora")]
REPORTS = {  # experiment -> the report scripts and their options; ablations: figures + one table row per setting
    "table2": [["make_tables.py", "--paper", *(f"--pair={a}={b}" for a, b in TABLE2_PAIRS)]],  # beside the paper
    "efficiency": [["make_figures.py", "--paper"]],            # timing runs: no scores; efficiency.md has the numbers
}


def report_commands(experiment: str, runs: Path, out: Path) -> list[list[str]]:
    """The report scripts of an experiment with their arguments: runs from `runs`, tables and figures into `out`."""
    scripts = REPORTS.get(experiment, [["make_tables.py", "--name", "results"], ["make_figures.py", "--paper"]])
    scripts = [[*s, *(f"--reference={r}" for r in reference(experiment))] if s[0] == "make_tables.py" else s
               for s in scripts]
    return [[script, str(runs), "--out", str(out), *options] for script, *options in scripts]


def report(experiment: str, args: argparse.Namespace) -> bool:
    """Rebuild the experiment's reports; False (after the others were tried) when a report script failed."""
    commands = report_commands(experiment, runs_root(experiment, args.out), args.out / experiment / "small_scale")
    codes = [subprocess.run([sys.executable, str(ROOT / "scripts" / script), *arguments], cwd=ROOT).returncode
             for script, *arguments in commands]
    return not any(codes)


# The representation analyses (experiments/analysis, scripts/analyze.py) of two committed seed-0 runs: LiME with
# the n-gram window the paper analyses (n = 3) and MoELoRA; 50 test samples per split (~7 CPU-minutes).
ANALYSED = ["ablation_ngram/small_scale/runs/seed0/routing.n_gram=3", "table2/small_scale/runs/seed0/peft=moe_lora"]


def analysis(args: argparse.Namespace) -> bool:
    """Rebuild experiments/analysis/small_scale once both analysed runs exist; False when analyze.py failed."""
    runs = [args.out / run for run in ANALYSED]
    if not all(completed(run) for run in runs):
        return True
    out = args.out / "analysis" / "small_scale"
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "analyze.py"), *map(str, runs), "--out", str(out),
                           "--max-samples", "50"], cwd=ROOT).returncode == 0


def main(argv: list[str] | None = None) -> int:
    """0 when every job ran and every report was written, else 1 (what failed is printed)."""
    args = parse_args(argv)
    if args.check:
        return check(args)
    failed = []
    if not args.report_only:
        pretrain_backbone()
        # One experiment after another, seed 0 of each first: a rerun stopped half-way (e.g. at the end of a
        # session) leaves whole experiments, and whole tables of fewer seeds.
        order = {experiment: i for i, experiment in enumerate(EXPERIMENTS)}
        todo = sorted((job for e in args.experiments for job in jobs(e, args)),
                      key=lambda job: (order[job.experiment], job.seed))
        done = sum(completed(job.run_dir(args.out)) for job in todo)
        print(f"{len(todo)} jobs, {done} already completed (skipped)", flush=True)
        pooled, alone = [j for j in todo if j.experiment not in TIMED], [j for j in todo if j.experiment in TIMED]
        for workers, batch in ((args.jobs, pooled), (1, alone)):
            with ThreadPoolExecutor(workers) as pool:
                oks = pool.map(lambda job: run(job, args), batch)
                failed += [f"{j.experiment} {j.run_dir(args.out)}" for j, ok in zip(batch, oks, strict=True) if not ok]
    reports = [e for e in args.experiments if runs_root(e, args.out).is_dir()]
    failed += [f"report of {e}" for e in reports if not report(e, args)]
    if {"table2", "ablation_ngram"} & set(args.experiments) and not analysis(args):
        failed.append("analysis (scripts/analyze.py)")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
