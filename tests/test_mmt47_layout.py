"""The loader on a dataset laid out exactly as the authors' release: a `train` split and
`{image|text|glue|video}_test_{task}` splits, columns `source_type, media_path, question, answer` (no `task`
column), images and videos as files; as a `save_to_disk` folder and as a local hub copy (parquet files)."""

import logging

import datasets
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from lime.data import mmt47
from lime.data.media import write_video

TAXONOMY = {"categories": {
    "GLUE": {"modality": "glue", "tasks": ["sst2", "cola"]},
    "Vision Benchmark": {"modality": "image", "tasks": ["okvqa"]},
    "Commonsense": {"modality": "text", "tasks": ["boolq"]},
    "Action Understanding": {"modality": "video", "tasks": ["action_count"]},
}}

# (split prefix, task, source type, question template, answers); the released train split mixes all of them
TASKS = [
    ("glue", "sst2", "text", "Classify the sentiment: {i} is fine.", ["positive", "negative"]),
    ("glue", "cola", "text", "Is this sentence grammatical? Sentence {i}", ["acceptable", "unacceptable"]),
    ("image", "okvqa", "image", "What is shown in the picture {i}?", ["cat", "dog"]),
    ("text", "boolq", "text", "Passage {i}. Question: is it true?", ["true", "false"]),
    ("video", "action_count", "video", "How many times does the action happen in clip {i}?", ["1", "2"]),
]


def _row(media_root, prefix, task, source_type, template, answers, i):
    media_path = ""
    if source_type == "image":
        media_path = f"images/{task}_{i}.png"
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(media_root / media_path)
    elif source_type == "video":
        media_path = f"videos/{task}_{i}.mp4"
        write_video(media_root / media_path, [np.full((32, 32, 3), 20 * k, np.uint8) for k in range(10)])
    return {"source_type": source_type, "media_path": media_path, "question": template.format(i=i),
            "answer": answers[i % 2]}


def released_layout(root, train_per_task=3, test_per_task=2, extra_splits=()):
    """DatasetDict in the authors' layout (and its media under root/media)."""
    media = root / "media"
    (media / "images").mkdir(parents=True, exist_ok=True)
    (media / "videos").mkdir(exist_ok=True)
    splits = {"train": []}
    for prefix, task, source_type, template, answers in TASKS:
        splits["train"] += [_row(media, prefix, task, source_type, template, answers, i)
                            for i in range(train_per_task)]
        splits[f"{prefix}_test_{task}"] = [_row(media, prefix, task, source_type, template, answers, 100 + i)
                                           for i in range(test_per_task)]
    for name in extra_splits:
        splits[name] = splits["glue_test_sst2"]
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


@pytest.fixture(params=["save_to_disk", "hub_parquet", "parquet_conversion"])
def container(request, tmp_path):
    """(data.path, media_root, the DatasetDict written there) in each form a user can have."""
    def write(extra_splits=()):
        dataset = released_layout(tmp_path, extra_splits=extra_splits)
        path = tmp_path / request.param
        if request.param == "save_to_disk":
            dataset.save_to_disk(str(path))
        else:
            for split, rows in dataset.items():
                # `hf download` of a pushed dataset: data/<split>-00000-of-00001.parquet (+ README, .cache);
                # the hub's parquet conversion: <config>/<split>/0000.parquet
                file = (path / "data" / f"{split}-00000-of-00001.parquet" if request.param == "hub_parquet"
                        else path / "default" / split / "0000.parquet")
                file.parent.mkdir(parents=True, exist_ok=True)
                rows.to_parquet(str(file))
            (path / ".cache" / "huggingface").mkdir(parents=True)
            (path / ".cache" / "huggingface" / "stale.parquet").write_bytes(b"not read")
            (path / "README.md").write_text("---\nlicense: mit\n---\n")
        return str(path), tmp_path / "media", dataset
    return write


def data_cfg(path, media_root, **overrides):
    return OmegaConf.create({"name": "released", "path": path, "media_root": str(media_root),
                             "taxonomy": TAXONOMY, **overrides})


def test_released_layout_has_no_task_column(tmp_path):
    dataset = released_layout(tmp_path)
    assert all(rows.column_names == ["source_type", "media_path", "question", "answer"] for rows in dataset.values())
    assert sorted(dataset) == sorted(["train", "glue_test_sst2", "glue_test_cola", "image_test_okvqa",
                                      "text_test_boolq", "video_test_action_count"])


def test_every_container_form_loads_the_same_rows(container):
    path, media_root, written = container()
    loaded = mmt47.load(data_cfg(path, media_root))
    assert sorted(loaded) == sorted(written)
    for split, rows in written.items():
        got = loaded[split].remove_columns("row_index").to_list()
        assert got == rows.to_list(), split
        assert loaded[split]["row_index"] == list(range(len(rows)))


def test_unknown_splits_raise_by_default_and_are_skipped_on_request(container, caplog):
    path, media_root, _ = container(extra_splits=("validation", "glue_test_mnli"))
    with pytest.raises(mmt47.SchemaError, match=r"\['glue_test_mnli', 'validation'\].*data.unknown_splits=skip"):
        mmt47.load(data_cfg(path, media_root))
    with caplog.at_level(logging.WARNING, logger="lime.data.mmt47"):
        loaded = mmt47.load(data_cfg(path, media_root, unknown_splits="skip"))
    assert "validation" not in loaded and "glue_test_mnli" not in loaded and len(loaded) == 6
    assert "skipped" in caplog.text and "validation" in caplog.text
    with pytest.raises(ValueError, match="data.unknown_splits"):
        mmt47.load(data_cfg(path, media_root, unknown_splits="ignore"))


def test_a_known_task_under_the_wrong_modality_is_still_a_schema_error(tmp_path):
    dataset = released_layout(tmp_path)
    dataset["image_test_sst2"] = dataset.pop("glue_test_sst2")
    dataset.save_to_disk(str(tmp_path / "d"))
    with pytest.raises(mmt47.SchemaError, match="image_test_sst2"):
        mmt47.load(data_cfg(str(tmp_path / "d"), tmp_path / "media", unknown_splits="skip"))


def test_a_folder_that_is_neither_form_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(mmt47.SchemaError, match="neither a save_to_disk directory"):
        mmt47.read(str(tmp_path / "empty"))


def test_parquet_split_names(tmp_path):
    for name in ("data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                 "data/video_test_action_count-00000-of-00001.parquet", "default/glue_test_sst2/0000.parquet",
                 "text_test_boolq.parquet", ".cache/huggingface/download/x.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = {split: [f.relative_to(tmp_path).as_posix() for f in files]
             for split, files in mmt47.parquet_splits(tmp_path).items()}
    assert found == {"train": ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"],
                     "video_test_action_count": ["data/video_test_action_count-00000-of-00001.parquet"],
                     "glue_test_sst2": ["default/glue_test_sst2/0000.parquet"],
                     "text_test_boolq": ["text_test_boolq.parquet"]}


# --------------------------------------------------------------------------------------------------------
# Ablation subsets without a `task` column: tasks assigned from the taxonomy's train_tasks rules
# --------------------------------------------------------------------------------------------------------

RULES = {
    "sst2": [{"question": "^Classify the sentiment"}],
    "cola": [{"question": "grammatical\\?"}],
    "okvqa": [{"source_type": "^image$", "media_path": "^images/okvqa_"}],
    "boolq": [{"question": "^Passage .*Question: "}],
    "action_count": [{"media_path": "^videos/action_count_"}],
}


def with_rules(rules=RULES):
    return {**TAXONOMY, "train_tasks": rules}


def test_a_subset_trains_on_its_tasks_only(container, capsys):
    path, media_root, _ = container()
    loaded = mmt47.load(data_cfg(path, media_root, taxonomy=with_rules(), tasks=["sst2", "okvqa"]))
    assert sorted(loaded) == ["glue_test_sst2", "image_test_okvqa", "train"]
    assert loaded["train"]["task"] == ["sst2"] * 3 + ["okvqa"] * 3
    assert loaded["train"]["row_index"] == [0, 1, 2, 6, 7, 8]  # positions in the stored train split
    assert "rows per task: {'action_count': 3, 'boolq': 3, 'cola': 3, 'okvqa': 3, 'sst2': 3}" in capsys.readouterr().out


def test_rules_must_give_every_row_exactly_one_task(tmp_path):
    released_layout(tmp_path).save_to_disk(str(tmp_path / "d"))
    missing = {task: rules for task, rules in RULES.items() if task != "boolq"}
    with pytest.raises(mmt47.SchemaError, match=r"3 row\(s\) match no task \(e.g. row 9 .*Passage 0"):
        mmt47.load(data_cfg(str(tmp_path / "d"), tmp_path / "media", taxonomy=with_rules(missing)))
    overlapping = {**RULES, "cola": [{"question": "Sentence|sentiment"}]}
    with pytest.raises(mmt47.SchemaError, match=r"3 row\(s\) match several tasks \(e.g. row 0 \['sst2', 'cola'\]"):
        mmt47.load(data_cfg(str(tmp_path / "d"), tmp_path / "media", taxonomy=with_rules(overlapping)))
    for bad, message in (({"mnli": [{"question": "x"}]}, "'mnli' is not a task"),
                         ({"sst2": [{"label": "x"}]}, "'label' is not one of the columns"),
                         ({"sst2": [{"question": "("}]}, "bad regex"), ({"sst2": [{}]}, "empty rule")):
        with pytest.raises(mmt47.SchemaError, match=message):
            mmt47.load(data_cfg(str(tmp_path / "d"), tmp_path / "media", taxonomy=with_rules(bad)))


def test_a_subset_that_cannot_be_honoured_is_refused(tmp_path):
    released_layout(tmp_path).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(mmt47.SchemaError, match="no 'task' column and the taxonomy has no train_tasks"):
        mmt47.load(data_cfg(str(tmp_path / "d"), tmp_path / "media", tasks=["sst2"]))
    assert len(mmt47.load(data_cfg(str(tmp_path / "d"), tmp_path / "media"))["train"]) == 15  # all tasks: fine
    no_train_rows = {**TAXONOMY, "categories": {**TAXONOMY["categories"],
                                                "Commonsense": {"modality": "text", "tasks": ["boolq", "piqa"]}}}
    with pytest.raises(mmt47.SchemaError, match=r"task\(s\) \['piqa'\] have no training rows"):
        mmt47.load(data_cfg(str(tmp_path / "d"), tmp_path / "media", taxonomy={**no_train_rows, "train_tasks": RULES},
                            tasks=["sst2", "piqa"]))


def test_mmt_mini_rules_recover_the_generators_tasks(tmp_path):
    from lime.data import mmt_mini

    root = mmt_mini.generate(tmp_path / "mini", seed=0, train_per_task=3, test_per_task=1)
    train = datasets.load_from_disk(str(root / mmt_mini.DATASET_DIR))["train"]
    rules = mmt47.TaskRules.from_config(OmegaConf.load(mmt47.TAXONOMY_DIR / "mmt_mini.yaml"))
    # The train split has the authors' four columns only: the generator's tasks are its rows in TASKS order
    # (3 each), shuffled by the documented permutation (mmt_mini._save_splits).
    assert train.column_names == ["source_type", "media_path", "question", "answer"]
    generated = [task.name for task in mmt_mini.TASKS for _ in range(3)]
    order = np.random.default_rng([0, 1]).permutation(len(generated))
    assert mmt47.assign_tasks(train, rules) == [generated[i] for i in order]


def test_released_layout_drives_an_ablation_subset_run(tmp_path):
    import json

    from lime.run import run
    from tests.test_train import compose_config

    released_layout(tmp_path).save_to_disk(str(tmp_path / "d"))
    cfg = compose_config("data=mmt47", f"data.path={tmp_path / 'd'}", f"data.media_root={tmp_path / 'media'}",
                         "data.tasks=[sst2,okvqa,action_count]", "model.pretrain=null", "trainer.max_steps=2",
                         "trainer.batch_size=3", "trainer.eval_batch_size=4", "trainer.max_new_tokens=2",
                         "trainer.progress_bar=false")
    OmegaConf.update(cfg, "data.taxonomy", with_rules(), merge=False)
    results = run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "train_tasks.json").read_text()) == {"action_count": 3, "okvqa": 3,
                                                                                 "sst2": 3}
    assert sorted(results["tasks"]) == ["action_count", "okvqa", "sst2"]
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["train_samples"] == 9
