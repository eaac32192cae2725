"""Train and evaluate a PEFT method (LiME or a baseline) on a model and a data set; everything is a config.

    python train.py                                                   # offline default (tiny model, mmt_mini, CPU)
    python train.py model=llava_ov peft=lime_dora data=mmt47 trainer=paper
    python train.py -m experiment=ablation_ngram                      # a Hydra multirun sweep
    python train.py mode=eval checkpoint=outputs/<date>/<time>        # evaluate a saved adapter
    python train.py --cfg job                                         # print the resolved config

An error prints one message and exits with status 1; `debug=true` (or LIME_DEBUG=1) shows the traceback.
"""

import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lime.config import ConfigError
from lime.run import find_run_to_resume, run


def run_to_resume(cfg: DictConfig, hydra_cfg: DictConfig, run_dir: Path) -> Path:
    """trainer.resume=true without hydra.run.dir continues the newest matching unfinished run under outputs/ (in
    its own directory, not in the fresh one Hydra named), or refuses, naming the candidates."""
    named = any(str(o).startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
    if cfg.trainer.get("resume") is not True or named or hydra_cfg.mode == RunMode.MULTIRUN:
        return run_dir
    try:
        found = find_run_to_resume(run_dir.parent.parent, cfg)  # outputs/<date>/<time>: all the dates
    finally:  # found or refused, the fresh directory Hydra made (its log file only) is not a run
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {f"{hydra_cfg.job.name}.log"}:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(f"trainer.resume=true: continuing {found}")
    return found


def debugging(cfg: DictConfig) -> bool:
    return bool(cfg.get("debug")) or os.environ.get("LIME_DEBUG", "0") not in ("", "0")


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run_dir = run_to_resume(cfg, hydra_cfg, run_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    # Hydra's own record of the run, written by lime.run once this run owns the directory (hydra.output_subdir
    # is null in configs/config.yaml, so that a second run into the same directory cannot overwrite them).
    hydra_files = {"config.yaml": cfg, "hydra.yaml": {"hydra": hydra_cfg}, "overrides.yaml": hydra_cfg.overrides.task}
    try:
        results = run(cfg, run_dir, experiment=hydra_cfg.runtime.choices.get("experiment"), hydra_files=hydra_files)
    except Exception as error:
        if debugging(cfg):
            raise
        print(f"error: {error}\n(run directory: {run_dir}; debug=true or LIME_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)
    return results.get("overall", {}).get("mean_of_tasks")  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
