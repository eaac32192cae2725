"""Train and evaluate a PEFT method (LiME or a baseline) on a model and a data set; everything is a config.

    python train.py                                                   # offline default (tiny model, mmt_mini, CPU)
    python train.py model=llava_ov peft=lime_dora data=mmt47 trainer=paper
    python train.py -m experiment=ablation_ngram                      # a Hydra multirun sweep
    python train.py mode=eval checkpoint=outputs/<date>/<time>        # evaluate a saved adapter
    python train.py --cfg job                                         # print the resolved config

An error prints one message and exits with status 1; `debug=true` (or LIME_DEBUG=1) shows the traceback.
"""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lime.run import run


def debugging(cfg: DictConfig) -> bool:
    return bool(cfg.get("debug")) or os.environ.get("LIME_DEBUG", "0") not in ("", "0")


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
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
