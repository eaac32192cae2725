"""lime.data: MMT-47 schema and subsets, the mmt_mini generator, media decoding, the collator, bad input."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lime.data import dataset, mmt47, mmt_mini
from lime.data.collate import IGNORE_INDEX, Collator, GenerationBatch, end_of_turn
from lime.data.dataset import DataError, MMTDataset, Sample, SampleId, Skip
from lime.data.media import MediaError, load_image, load_video, sample_indices, write_video

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"
SMALL = {"seed": 0, "train_per_task": 12, "test_per_task": 6, "image_size": 32, "video_size": 32}


def data_config(name: str = "mmt_mini", **overrides):
    """configs/data/<name>.yaml with its taxonomy composed in, as Hydra would."""
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    del cfg["defaults"]
    cfg.taxonomy = OmegaConf.load(CONFIGS / "taxonomy" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


@pytest.fixture(scope="module")
def mini_cfg(tmp_path_factory):
    """A small mmt_mini generated once for this module; the config that loads it."""
    cfg = data_config(cache_dir=str(tmp_path_factory.mktemp("mmt_mini")), generate=SMALL)
    mmt_mini.ensure(cfg)
    return cfg


@pytest.fixture(scope="module")
def mini(mini_cfg):
    return dataset.build(mini_cfg)


def rows(**columns) -> datasets.Dataset:
    return datasets.Dataset.from_dict({key: list(value) for key, value in columns.items()})


def text_rows(n: int = 2, **overrides) -> datasets.Dataset:
    columns = {"source_type": ["text"] * n, "media_path": [""] * n, "question": ["q?"] * n, "answer": ["a"] * n}
    return rows(**{**columns, **overrides})


# --- taxonomy and schema -------------------------------------------------------------------------

def test_mmt47_taxonomy_has_the_papers_47_tasks_in_7_categories():
    taxonomy = mmt47.Taxonomy.named("mmt47")
    sizes = {name: len(tasks) for name, tasks in taxonomy.categories.items()}
    assert sizes == {"Vision Benchmark": 8, "Image Classification": 6, "Commonsense": 8, "GLUE": 6,
                     "Action Understanding": 7, "Object Motion & Spatial": 7, "High-Level Reasoning": 5}
    assert len(set(taxonomy.tasks)) == 47
    # The paper does not publish the video grouping: exactly the video categories are marked inferred.
    assert taxonomy.inferred == {name for name, m in taxonomy.modalities.items() if m == "video"}
    assert taxonomy.metric("stsb") == {"metric": "pearson"}
    assert taxonomy.metric("sst2") == {"metric": "exact"}
    assert mmt47.split_info("glue_test_sst2") == ("glue", "sst2", "GLUE")
    assert mmt47.split_info("video_test_moving_direction").category == "Object Motion & Spatial"
    assert taxonomy.split_name("boolq") == "text_test_boolq"


@pytest.mark.parametrize("split", ["validation", "image_test_sst2", "glue_test_nope", "audio_test_sst2"])
def test_unknown_split_names_are_errors_naming_the_split(split):
    with pytest.raises(mmt47.SchemaError, match=split):
        mmt47.split_info(split)


def test_mmt_mini_taxonomy_matches_the_generator():
    taxonomy = mmt47.Taxonomy.named("mmt_mini")
    assert list(taxonomy.categories) == list(mmt47.Taxonomy.named("mmt47").categories)  # the paper's 7
    assert all(len(tasks) >= 2 for tasks in taxonomy.categories.values())
    assert sorted(taxonomy.tasks) == sorted(task.name for task in mmt_mini.TASKS)
    for task in mmt_mini.TASKS:
        assert taxonomy.modalities[taxonomy.category_of(task.name)] == task.modality
        chance = taxonomy.metric(task.name)["chance"]
        expected = 0.0 if taxonomy.metric(task.name)["metric"] == "pearson" else 1 / len(task.answers)
        assert chance == pytest.approx(expected, abs=1e-3)
    assert {task.source_type for task in mmt_mini.TASKS} == {"text", "image", "video"}


def test_missing_column_is_an_error_naming_split_and_column():
    data = datasets.DatasetDict({"train": text_rows(), "glue_test_sst2": text_rows().remove_columns("answer")})
    with pytest.raises(mmt47.SchemaError, match=r"'glue_test_sst2'.*missing column.*'answer'"):
        mmt47.validate(data, mmt47.Taxonomy.named("mmt47"))


def test_unknown_split_in_a_dataset_is_an_error():
    data = datasets.DatasetDict({"train": text_rows(), "validation": text_rows()})
    with pytest.raises(mmt47.SchemaError, match="'validation'"):
        mmt47.validate(data, mmt47.Taxonomy.named("mmt47"))


def test_unknown_source_type_raises_or_is_skipped_and_counted(caplog):
    data = datasets.DatasetDict({"glue_test_cola": text_rows(3, source_type=["text", "audio", "text"])})
    taxonomy = mmt47.Taxonomy.named("mmt47")
    with pytest.raises(mmt47.SchemaError, match=r"'glue_test_cola', column 'source_type'.*'audio'.*index 1"):
        mmt47.validate(data, taxonomy)
    with caplog.at_level(logging.WARNING):
        mmt47.validate(data, taxonomy, on_error="skip")
    assert "will be skipped" in caplog.text
    item = MMTDataset(data["glue_test_cola"], "glue_test_cola", None, on_error="skip")[1]
    assert isinstance(item, Skip) and item.kind == "unknown_source_type" and str(item.id) == "glue_test_cola[1]"


def test_a_path_that_is_neither_a_directory_nor_reachable_names_the_key(tmp_path):
    with pytest.raises(mmt47.SchemaError, match="data.path"):
        mmt47.read(str(tmp_path / "nowhere"))


def test_wrong_media_root_fails_early(mini_cfg, tmp_path):
    with pytest.raises(mmt47.SchemaError, match="media_root"):
        mmt47.load(OmegaConf.merge(mini_cfg, {"path": mmt47.paths(mini_cfg)[0], "media_root": str(tmp_path)}))


# --- subsets -------------------------------------------------------------------------------------

def test_subset_by_category_and_task(mini_cfg):
    data = mmt47.load(OmegaConf.merge(mini_cfg, {"categories": ["GLUE"], "tasks": ["shape"]}))
    assert sorted(data) == sorted(["train", "glue_test_sentiment", "glue_test_paraphrase",
                                   "glue_test_grammar", "image_test_shape"])
    with pytest.raises(mmt47.SchemaError, match="Glue"):
        mmt47.load(OmegaConf.merge(mini_cfg, {"categories": ["Glue"]}))
    with pytest.raises(mmt47.SchemaError, match="sst2"):
        mmt47.load(OmegaConf.merge(mini_cfg, {"tasks": "sst2"}))


def test_samples_per_split_are_random_with_a_seed(mini_cfg):
    def picked(seed):
        data = mmt47.load(OmegaConf.merge(mini_cfg, {"max_eval_samples": 3, "max_train_samples": 20, "seed": seed}))
        assert len(data["train"]) == 20 and all(len(rows) == 3 for split, rows in data.items() if split != "train")
        return {split: list(rows["row_index"]) for split, rows in data.items()}

    first = picked(0)
    assert first == picked(0)
    assert first != picked(1)
    assert any(indices != [0, 1, 2] for indices in first.values())  # not "the first N"


def test_train_split_without_task_column_or_rules_cannot_be_subset():  # more: test_mmt47_layout.py
    data = datasets.DatasetDict({"train": text_rows(4), "glue_test_sst2": text_rows(), "glue_test_cola": text_rows()})
    with pytest.raises(mmt47.SchemaError, match="no 'task' column"):
        mmt47.select(data, mmt47.Taxonomy.named("mmt47"), tasks=["sst2"])
    assert len(mmt47.select(data, mmt47.Taxonomy.named("mmt47"))["train"]) == 4  # no subset: nothing to honour


# --- generator -----------------------------------------------------------------------------------

def test_generator_is_deterministic(tmp_path):
    sizes = {"train_per_task": 2, "test_per_task": 1}
    first, again, other = (mmt_mini.generate(tmp_path / name, seed=seed, **sizes)
                           for name, seed in (("a", 0), ("b", 0), ("c", 1)))

    def content(root):
        data = datasets.load_from_disk(str(root / mmt_mini.DATASET_DIR))
        return {split: data[split].to_list() for split in data}

    assert content(first) == content(again)
    assert content(first) != content(other)
    for row in content(first)["train"]:
        ours, theirs = first / "media" / row["media_path"], again / "media" / row["media_path"]
        if row["source_type"] == "image":
            assert ours.read_bytes() == theirs.read_bytes()
        elif row["source_type"] == "video":
            np.testing.assert_array_equal(load_video(ours), load_video(theirs))


def test_generated_benchmark_is_balanced_and_complete(mini_cfg):
    path, media_root = mmt47.paths(mini_cfg)
    data = datasets.load_from_disk(path)
    taxonomy = mmt47.Taxonomy.named("mmt_mini")
    assert sorted(data) == sorted(["train", *(taxonomy.split_name(task.name) for task in mmt_mini.TASKS)])
    # The authors' format exactly: their four columns in every split, no `task` column in train.
    assert all(split.column_names == list(mmt_mini.FEATURES) for split in data.values())
    expected_train = Counter()
    for task in mmt_mini.TASKS:
        test = data[taxonomy.split_name(task.name)]
        counts = Counter(test["answer"])
        assert len(test) == SMALL["test_per_task"] and set(counts) <= set(task.answers)
        assert max(counts.values()) - min(counts.values(), default=0) <= 1  # balanced: chance = 1/classes
        assert len(counts) == min(SMALL["test_per_task"], len(task.answers))
        assert set(test["source_type"]) == {task.source_type}
        if task.source_type != "text":
            assert all((media_root / p).is_file() for p in test["media_path"])
        expected_train.update(task.answers[i % len(task.answers)] for i in range(SMALL["train_per_task"]))
    assert Counter(data["train"]["answer"]) == expected_train  # every task's balanced labels, no more
    assert len(data["train"]) == SMALL["train_per_task"] * len(mmt_mini.TASKS)


def test_visual_questions_never_give_the_answer_away():
    """The same random draws with every label give one question: only the media tell the labels apart."""
    for task in mmt_mini.TASKS:
        if task.source_type != "text":
            questions = {task.make(np.random.default_rng(0), label, 32)[0] for label in task.answers}
            assert len(questions) == 1, task.name


def test_tasks_share_inputs_with_different_questions_and_answers():
    """Routing has something to do: tasks on one scene kind ask different questions with different answers,
    and every scene kind a task names is one the pretraining mixture describes."""
    by_scene = {}
    for task in mmt_mini.TASKS:
        if task.scene is not None:
            by_scene.setdefault(task.scene, []).append(task)
    shared = {scene: tasks for scene, tasks in by_scene.items() if len(tasks) > 1}
    assert sorted(shared) == ["change_clip", "grid_scene", "motion_clip", "object_scene"]
    for tasks in shared.values():
        questions = {t.make(np.random.default_rng(0), t.answers[0], 32)[0] for t in tasks}
        assert len(questions) == len(tasks)
    assert {t.answers for t in shared["grid_scene"]} == {mmt_mini.COUNTS, ("yes", "no")}
    described = {scene.__name__ for scenes in mmt_mini.PRETRAINING_SCENES.values() for scene in scenes}
    assert set(by_scene) == described


def test_pretraining_mixture_has_no_benchmark_question_or_answer(tmp_path):
    """Captions and text passages only: the backbone never sees the benchmark's instructions or answers."""
    root = mmt_mini.generate_pretraining(tmp_path, seed=1000, samples=48)
    rows = datasets.load_from_disk(str(root / mmt_mini.DATASET_DIR))["train"]
    assert len(rows) == 48 and rows.column_names == list(mmt_mini.FEATURES)
    assert Counter(rows["source_type"]) == {"image": 12, "video": 30, "text": 6}
    assert all(q in mmt_mini.DESCRIBE.values() or q.startswith(mmt_mini.CONTINUE) for q in rows["question"])
    answers = {a for task in mmt_mini.TASKS for a in task.answers}
    assert not answers & set(rows["answer"])
    assert all((root / mmt_mini.MEDIA_DIR / p).is_file() for p in rows["media_path"] if p)


def test_ensure_generates_once_per_setting(mini_cfg):
    root = mmt_mini.ensure(mini_cfg)
    stamp = (root / mmt_mini.COMPLETE).stat().st_mtime_ns
    assert mmt_mini.ensure(mini_cfg) == root and (root / mmt_mini.COMPLETE).stat().st_mtime_ns == stamp
    other = OmegaConf.merge(mini_cfg, {"generate": {"seed": 1}})
    assert mmt_mini.cache_key(mmt_mini.generator_params(other.generate)) != root.name
    with pytest.raises(ValueError, match="train_size"):
        mmt_mini.generator_params({"train_size": 3})


# --- media ---------------------------------------------------------------------------------------

def test_uniform_frame_sampling():  # the rounding option (data.frame_sampling=round); floor: test_frame_sampling.py
    assert sample_indices(16, 8, "round") == [0, 2, 4, 6, 9, 11, 13, 15]
    assert sample_indices(8, 8, "round") == list(range(8))
    assert sample_indices(5, 8, "round") == list(range(5))


def grey_clip(n: int) -> list[np.ndarray]:
    """Frame i is uniformly grey at level 10 * i, so decoded frames tell which frame they are."""
    return [np.full((32, 32, 3), 10 * i, dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize(("length", "expected"), [(16, [0, 2, 4, 6, 9, 11, 13, 15]), (5, [0, 1, 2, 3, 4, 4, 4, 4])])
def test_video_frames_are_sampled_uniformly_and_short_clips_padded(tmp_path, length, expected):
    write_video(tmp_path / "clip.mp4", grey_clip(length))
    frames = load_video(tmp_path / "clip.mp4", num_frames=8, sampling="round")
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.reshape(8, -1).mean(axis=1), 10 * np.array(expected), atol=3)


def bad_media(tmp_path: Path) -> dict[str, tuple[str, Path]]:
    """kind -> (source_type, file) for every bad-input case of the issue."""
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    return {"missing_image": ("image", tmp_path / "missing.png"), "corrupt_image": ("image", tmp_path / "corrupt.png"),
            "truncated_image": ("image", tmp_path / "truncated.png"), "missing_video": ("video", tmp_path / "no.mp4"),
            "empty_video": ("video", tmp_path / "empty.mp4"), "corrupt_video": ("video", tmp_path / "corrupt.mp4")}


def test_bad_media_files_are_errors_naming_the_file(tmp_path):
    for source_type, path in bad_media(tmp_path).values():
        with pytest.raises(MediaError, match=str(path)):
            load_image(path) if source_type == "image" else load_video(path)


def bad_split(tmp_path: Path) -> datasets.Dataset:
    """A split with one row per bad-input case, then an empty answer and one good row."""
    cases = bad_media(tmp_path)
    types = [source_type for source_type, _ in cases.values()] + ["text", "image"]
    paths = [path.name for _, path in cases.values()] + ["", "good.png"]
    answers = ["a"] * len(cases) + ["  ", "red"]
    return rows(source_type=types, media_path=paths, question=["q?"] * len(types), answer=answers)


def test_every_bad_input_raises_naming_split_index_and_path(tmp_path):
    split = MMTDataset(bad_split(tmp_path), "image_test_shape", tmp_path)
    for index in range(len(split) - 1):
        with pytest.raises(DataError, match=rf"image_test_shape\[{index}\]") as info:
            split[index]
        if info.value.skip.kind != "empty_answer":
            assert str(tmp_path) in str(info.value)
    assert isinstance(split[len(split) - 1], Sample)


def test_with_skip_bad_inputs_are_counted_and_reported(tmp_path, tiny_llava):
    _, processor = tiny_llava
    split = MMTDataset(bad_split(tmp_path), "image_test_shape", tmp_path, on_error="skip")
    collator = Collator(processor, mode="generate")
    batch = collator([split[i] for i in range(len(split))])
    assert batch.ids == [SampleId("image_test_shape", len(split) - 1)] and batch.references == ["red"]
    kinds = {"missing_image": 1, "corrupt_image": 2, "missing_video": 1, "empty_video": 1, "corrupt_video": 1,
             "empty_answer": 1}
    assert collator.skip_log.counts() == kinds == Counter(skip.kind for skip in batch.skipped)
    assert collator.skip_log.summary().startswith("7 sample(s) skipped")
    with pytest.raises(RuntimeError, match="every sample"):  # training never gets an empty batch
        Collator(processor)([split[0]])


def test_dataset_decodes_media(mini):
    video = next(mini[s] for s in mini if s.startswith("video_test"))[0]
    assert video.video.shape == (8, 32, 32, 3) and Path(video.media_path).is_file()
    image = mini["image_test_shape"][0]
    assert image.image.mode == "RGB" and image.image.size == (32, 32)
    assert mini["text_test_compare"][0].messages() == [
        {"role": "user", "content": [{"type": "text", "text": mini["text_test_compare"][0].question}]}]
    assert image.messages()[0]["content"][0] == {"type": "image"}  # media placeholder first, then the question


# --- collator ------------------------------------------------------------------------------------

def mixed_items(mini) -> list[Sample]:
    """A text, an image, a video, a GLUE and a second video sample: a mixed-modality batch."""
    return [mini["text_test_arithmetic"][0], mini["image_test_shape"][1], mini["video_test_grow_shrink"][2],
            mini["glue_test_grammar"][3], mini["video_test_tamper_type"][4]]


def test_labels_cover_exactly_the_answer_and_end_of_turn(mini, tiny_model):
    model, processor = tiny_model
    tok = processor.tokenizer
    items = mixed_items(mini)
    batch = Collator(processor, max_length=512)(items)
    assert end_of_turn(processor) == "<|im_end|>\n"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    media_ids = {processor.image_token_id, processor.video_token_id}
    for row, sample in enumerate(items):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        length = int(batch["attention_mask"][row].sum())
        answer = tok(sample.answer, add_special_tokens=False)["input_ids"]
        labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        # Token by token: the answer and <|im_end|>, at the end of the real tokens, before the final "\n".
        assert [labels[i] for i in labelled] == [*answer, im_end] == [ids[i] for i in labelled]
        assert labelled == list(range(length - len(answer) - 2, length - 1))
        assert tok.decode(ids[:labelled[0]]).endswith("<|im_start|>assistant\n")  # the generation prompt
        assert all(ids[i] == tok.pad_token_id for i in range(length, len(ids)))  # right padding, unlabelled
        assert not media_ids & {ids[i] for i in labelled}
        has_media = {token for token in ids if token in media_ids}
        expected_media = {"text": set(), "image": {processor.image_token_id}, "video": {processor.video_token_id}}
        assert has_media == expected_media[sample.source_type]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_generation_batches_are_left_padded_prompts_with_references_aside(mini, tiny_model):
    model, processor = tiny_model
    items = mixed_items(mini)
    batch = Collator(processor, mode="generate")(items)
    assert isinstance(batch, GenerationBatch) and "labels" not in batch.inputs
    assert batch.ids == [item.id for item in items] and batch.references == [item.answer for item in items]
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for ids, mask in zip(batch.inputs["input_ids"].tolist(), batch.inputs["attention_mask"].tolist(), strict=True):
        assert ids[-len(header):] == header and mask[-1] == 1 and mask == sorted(mask)  # left padding
    with torch.no_grad():
        out = model.generate(**batch.inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[0] == len(items)


def test_too_long_samples_are_an_error_or_a_counted_skip(mini, tiny_llava):
    _, processor = tiny_llava
    items = [mini["text_test_compare"][0], mini["video_test_scene_change"][0]]  # the video is much longer
    limit = 60
    with pytest.raises(DataError, match=r"video_test_scene_change\[\d+\].*max_length=60"):
        Collator(processor, max_length=limit)(items)
    collator = Collator(processor, max_length=limit, truncation="skip")
    batch = collator(items)
    assert batch["input_ids"].shape[0] == 1 and collator.skip_log.counts() == {"too_long": 1}
    assert (batch["labels"] != IGNORE_INDEX).sum() > 0  # the kept sample keeps its whole answer
