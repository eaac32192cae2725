"""Every paper experiment at small scale (the tiny LLaVA-OneVision on mmt_mini, CPU), then its tables and figures,
regenerated from the logged runs, into experiments/<experiment>/small_scale/.

    python scripts/small_scale.py                                  # all of them, two jobs at a time (~2 h on 2 cores)
    python scripts/small_scale.py ablation_ngram table2 --jobs 4   # some of them
    python scripts/small_scale.py --epochs 3                       # three epochs instead of one: ~2x the time
    python scripts/small_scale.py --report-only                    # rebuild the reports from the runs already there
    python scripts/small_scale.py --check table2 --group lime_lora --seed 0   # rerun one committed job, compare

An experiment is the paper's sweep (configs/experiment/<name>.yaml) with the small-scale groups on the command
line, which win over the experiment's (Hydra applies command-line overrides after the sweeper's params). Each
(experiment, seed) is one `train.py -m` process: runs go to <runs>/<experiment>/seed<S>/<job>, its log to
<runs>/logs/. The timed experiment (efficiency) runs after the others, alone on the machine. A failed process is
reported and left out of the reports; the others go on.

--check reruns one committed job from empty caches (benchmark, pretraining mixture and backbone rebuilt in a
temporary directory, as on a fresh machine) and compares its category scores and Mean exactly (float equality)
with the committed experiments/<experiment>/small_scale/<table>_runs.csv row of that group and seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = [  # the longest sweeps first, so that the job pool ends together; then the timed one, alone
    "table2", "ablation_experts", "ablation_gamma", "ablation_topk", "ablation_balance", "ablation_init",
    "ablation_ngram", "ablation_temperature", "ablation_layers", "ablation_channels", "ablation_targets",
    "ablation_router", "ablation_shared", "efficiency",
]
TIMED = {"efficiency"}  # run alone: other jobs on the machine would be in its times
SMALL = ["model=tiny_llava_ov", "data=mmt_mini", "trainer=smoke", "trainer.progress_bar=false"]
# Where the tiny model cannot take the paper's value: it has 2 language-model blocks, not 24.
TINY_SWEEPS = {"ablation_layers": ["peft.layer_indices=[1],null"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", metavar="NAME",
                        help=f"experiments to run (default: all): {', '.join(EXPERIMENTS)}")
    parser.add_argument("--runs", type=Path, default=ROOT / "multirun" / "small_scale", help="run directory root")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments", help="reports: <out>/<name>/small_scale")
    parser.add_argument("--jobs", type=int, default=2, help="train.py processes at a time (one CPU thread each)")
    parser.add_argument("--epochs", type=int, default=1, help="trainer.epochs (trainer=smoke: 1)")
    parser.add_argument("--table2-seeds", default="0,1,2")
    parser.add_argument("--ablation-seeds", default="0,1,2")
    parser.add_argument("--report-only", action="store_true", help="skip training; rebuild the reports")
    parser.add_argument("--check", metavar="NAME", help="rerun one committed job of this experiment and compare")
    parser.add_argument("--group", help="--check: the job's group in <table>_runs.csv (table2: the peft name)")
    parser.add_argument("--seed", default="0", help="--check: the job's seed")
    parser.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                        help="--check: the job's overrides (default for table2: peft=<group>)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.experiments) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiments {unknown}; choose from {EXPERIMENTS}")
    args.experiments = args.experiments or EXPERIMENTS
    if args.check and (args.check not in EXPERIMENTS or args.check in TIMED or not args.group):
        parser.error("--check needs a scored experiment name and --group")
    return args


def seeds(experiment: str, args: argparse.Namespace) -> list[str]:
    if experiment == "efficiency":
        return ["0"]  # timing; the paper reports one run per method
    return (args.table2_seeds if experiment == "table2" else args.ablation_seeds).split(",")


def command(experiment: str, seed: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", f"experiment={experiment}", *SMALL,
            f"trainer.epochs={args.epochs}", f"seed={seed}", *TINY_SWEEPS.get(experiment, []),
            f"hydra.sweep.dir={args.runs / experiment / f'seed{seed}'}"]


def check(args: argparse.Namespace) -> int:
    """Rerun one committed job from empty caches; 0 when every committed number is reproduced exactly."""
    import csv
    import json
    import tempfile

    committed = args.out / args.check / "small_scale"
    table = committed / ("table2_runs.csv" if args.check == "table2" else "results_runs.csv")
    rows = [r for r in csv.DictReader(table.open()) if r["group"] == args.group and r["seed"] == args.seed]
    if len(rows) != 1:
        print(f"{table}: {len(rows)} rows of group {args.group!r}, seed {args.seed}", file=sys.stderr)
        return 1
    overrides = args.set if args.set is not None else [f"peft={args.group}"]
    with tempfile.TemporaryDirectory(prefix="lime-check-") as tmp:
        cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={args.check}", *SMALL,
               f"trainer.epochs={args.epochs}", f"seed={args.seed}", *overrides,
               f"data.cache_dir={tmp}/data", f"model.pretrain.cache_dir={tmp}/backbones", f"hydra.run.dir={tmp}/run"]
        print(" ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode:
            return 1
        results = json.loads((Path(tmp) / "run" / "results.json").read_text())
    wrong = mismatches(rows[0], results)
    print("\n".join(wrong) if wrong else f"reproduced exactly: {args.check} {args.group} seed {args.seed} "
          f"({rows[0]['run']})")
    return 1 if wrong else 0


def mismatches(committed: dict[str, str], results: dict) -> list[str]:
    """Every category score and the Mean of a rerun's results.json that differs from its committed
    <table>_runs.csv row (the CSV holds Python's shortest round-trip repr: equal floats print equal)."""
    ours = {name: entry.get("score") for name, entry in results["categories"].items()}
    ours["Mean"] = results["overall"]["mean_of_categories"]
    missing = [f"{name}: committed {committed[name]}, not in the rerun" for name in committed
               if name not in ours and name not in RUN_COLUMNS]
    return missing + [f"{name}: committed {committed.get(name)!r}, rerun {value!r}" for name, value in ours.items()
                      if name not in committed or value is None or float(committed[name]) != value]


RUN_COLUMNS = {"method", "group", "seed", "run", "trainable_params", "total_params"}  # <table>_runs.csv, not scores


def run(experiment: str, seed: str, args: argparse.Namespace) -> bool:
    log = args.runs / "logs" / f"{experiment}-seed{seed}.log"
    start = time.perf_counter()
    print(f"start  {experiment} seed {seed}", flush=True)
    with log.open("w") as f:
        process = subprocess.run(command(experiment, seed, args), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    ok = process.returncode == 0
    print(f"{'done  ' if ok else 'FAILED'} {experiment} seed {seed} in {time.perf_counter() - start:.0f}s"
          + ("" if ok else f" (see {log})"), flush=True)
    return ok


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


REPORTS = {  # experiment -> the report scripts and their options; ablations: figures + one table row per setting
    "table2": [["make_tables.py", "--paper"]],                 # beside the paper's rows
    "efficiency": [["make_figures.py", "--paper"]],            # timing runs: no scores; efficiency.md has the numbers
}


def report(experiment: str, args: argparse.Namespace) -> bool:
    """Rebuild the experiment's reports; False (after the others were tried) when a report script failed."""
    runs, out = str(args.runs / experiment), str(args.out / experiment / "small_scale")
    scripts = REPORTS.get(experiment, [["make_tables.py", "--name", "results"], ["make_figures.py", "--paper"]])
    scripts = [[*s, *(f"--reference={r}" for r in reference(experiment))] if s[0] == "make_tables.py" else s
               for s in scripts]
    codes = [subprocess.run([sys.executable, str(ROOT / "scripts" / script), runs, "--out", out, *options],
                            cwd=ROOT).returncode for script, *options in scripts]
    return not any(codes)


def main(argv: list[str] | None = None) -> int:
    """0 when every sweep ran and every report was written, else 1 (what failed is printed)."""
    args = parse_args(argv)
    if args.check:
        return check(args)
    failed = []
    if not args.report_only:
        (args.runs / "logs").mkdir(parents=True, exist_ok=True)
        pretrain_backbone()
        units = [(e, s) for e in args.experiments for s in seeds(e, args)]
        pooled, alone = [u for u in units if u[0] not in TIMED], [u for u in units if u[0] in TIMED]
        for jobs, batch in ((args.jobs, pooled), (1, alone)):
            with ThreadPoolExecutor(jobs) as pool:
                failed += [u for u, ok in zip(batch, pool.map(lambda u: run(*u, args), batch), strict=True) if not ok]
    reports = [e for e in args.experiments if (args.runs / e).is_dir()]
    failed += [f"report of {e}" for e in reports if not report(e, args)]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
