"""Prepare a dataset and print what a run will see: rows per split and per category.

    python scripts/prepare_data.py data=mmt_mini      # generate the built-in benchmark into its cache
    python scripts/prepare_data.py data=mmt47 data.path=data/mmt47/dataset data.media_root=data/mmt47/media
    python scripts/prepare_data.py data=mmt47 +scan=true   # also decode every media file, list the bad ones

The last line printed is one JSON object: {"path", "media_root", "splits", "categories", "skipped"}.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lime.data import dataset, mmt47

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def prepare(data_cfg: DictConfig, scan: bool = False) -> dict:
    """Load (generating mmt_mini on first use) and validate `data_cfg`; with `scan`, decode every sample."""
    splits = dataset.build(data_cfg)
    path, media_root = mmt47.paths(data_cfg)
    taxonomy = mmt47.Taxonomy.from_config(data_cfg.taxonomy)
    categories = Counter()
    for split, rows in splits.items():
        if split != mmt47.TRAIN_SPLIT:
            categories[taxonomy.split_info(split).category] += len(rows)
    summary = {"path": path, "media_root": str(media_root), "splits": {s: len(r) for s, r in splits.items()},
               "categories": dict(categories), "skipped": None}
    if scan:
        log = dataset.SkipLog()
        for split in splits.values():
            checked = dataset.MMTDataset(split.rows, split.split, split.media_root, split.num_frames, "skip",
                                           split.frame_sampling)
            for item in checked:
                if isinstance(item, dataset.Skip):
                    log.add(item)
        print(log.summary())
        summary["skipped"] = log.counts()
    return summary


def main(argv: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="config", overrides=argv)
    start = time.perf_counter()
    summary = prepare(cfg.data, scan=bool(cfg.get("scan", False)))
    for split, n in summary["splits"].items():
        print(f"{split:40s} {n:>8,}")
    print(f"ready in {time.perf_counter() - start:.1f}s: {summary['path']} (media: {summary['media_root']})")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(main(sys.argv[1:])))
