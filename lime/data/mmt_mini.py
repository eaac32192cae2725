"""mmt_mini: a small benchmark in MMT-47's exact format, generated offline (data=mmt_mini), and the
pretraining mixture of the tiny backbone that is adapted to it (lime/pretrain.py).

Eighteen synthetic tasks cover the paper's 7 categories (configs/data/taxonomy/mmt_mini.yaml) with text,
image and video samples; docs/mmt_mini.md says what each task tests. Media are real files: PNG images drawn
with PIL and MP4 videos encoded with PyAV. The tasks are built for multi-task interference, the setting
LiME's routing is for: several tasks ask different questions about the same kind of scene (a single object:
its shape or its colour; a moving object: its direction, colour or shape; a background change: the first or
the final colour) with different label spaces and answer formats (words, digits, yes/no, option letters),
beside text tasks. Answers are balanced (the label is drawn first, then a sample showing it).

The pretraining mixture teaches perception and language without the benchmark's instructions or answer
formats: every scene kind with a caption ("Describe the image." -> "a red circle"), and generic sentences
to continue ("Continue the text: 12 is larger" -> "than 7."). A backbone pretrained on it answers the
benchmark's questions with captions and sentences, not with its answers: it scores near zero until adapted.

Layout of a generated copy (`ensure` caches it under data.cache_dir/<hash of the generator params>):
    dataset/              DatasetDict.save_to_disk: train + {modality}_test_{task} (the authors' columns only)
    media/images/<task>/<split>_<i>.png
    media/videos/<task>/<split>_<i>.mp4
The pretraining mixture (`ensure_pretraining`) has the same layout with one `train` split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

from lime.data.media import write_video
from lime.data.mmt47 import TRAIN_SPLIT, Taxonomy

logger = logging.getLogger(__name__)

# Bump when generated content changes: it is part of the cache key.
GENERATOR_VERSION = 7
DATASET_DIR = "dataset"
MEDIA_DIR = "media"
COMPLETE = "COMPLETE.json"
DEFAULTS = {"seed": 0, "train_per_task": 200, "test_per_task": 200, "image_size": 32, "video_size": 32}
FEATURES = datasets.Features({name: datasets.Value("string")
                              for name in ("source_type", "media_path", "question", "answer")})

COLORS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 80, 230), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
WHITE = (255, 255, 255)
PALETTE = {**COLORS, **{f"pale {name}": tuple((c + 255) // 2 for c in rgb) for name, rgb in COLORS.items()}}
CLIP_LENGTHS = (6, 8, 12, 16)  # 6-frame clips exercise the padding to 8 frames
LETTERS = "AB"
DESCRIBE = {"image": "Describe the image.", "video": "Describe the video."}
CONTINUE = "Continue the text:"


@dataclass(frozen=True)
class Scene:
    """What a sample shows: media (None for text) and a caption of it (the pretraining target)."""

    media: Any
    caption: str


@dataclass(frozen=True)
class Task:
    """One benchmark task: `make(rng, label, size)` returns (question, scene) whose answer is `label`."""

    name: str
    modality: str  # split prefix: text / image / video / glue
    answers: tuple[str, ...]
    make: Callable[[np.random.Generator, str, int], tuple[str, Scene]]
    scene: str | None = None  # the scene kind it asks about (tasks sharing one share their inputs); None: text

    @property
    def source_type(self) -> str:
        return "text" if self.modality == "glue" else self.modality


# --- drawing -------------------------------------------------------------------------------------

def _canvas(size: int, background: tuple[int, int, int] = WHITE) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), background)
    return image, ImageDraw.Draw(image)


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: str) -> None:
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = max(1.0, r / 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def _frame(size: int, objects: list[tuple[str, float, float, float, str]],
           background: tuple[int, int, int] = WHITE) -> np.ndarray:
    image, draw = _canvas(size, background)
    for shape, cx, cy, r, color in objects:
        _shape(draw, shape, cx, cy, r, color)
    return np.asarray(image)


def _pick(rng: np.random.Generator, options, k: int | None = None, exclude=()):
    pool = [option for option in options if option not in exclude]
    if k is None:
        return pool[rng.integers(len(pool))]
    return [pool[i] for i in rng.permutation(len(pool))[:k]]


def _or_pick(rng: np.random.Generator, value: str | None, options, exclude=()) -> str:
    """`value` when a task fixed it (its label), else a random option: one drawer serves every task."""
    return value if value is not None else _pick(rng, options, exclude=exclude)


def _caption(rng: np.random.Generator, *templates: str) -> str:
    """One of several phrasings of a caption: the backbone learns every word of a scene in several positions
    (so no single first word is entrenched), while no phrasing is a benchmark answer (two words or more)."""
    return _pick(rng, templates)


NUMBER_WORDS = ("one", "two", "three", "four")


def _choice_question(question: str, options: list[str]) -> str:
    return f"{question} {' '.join(f'{LETTERS[i]}. {o}' for i, o in enumerate(options))} Answer with the letter."


# --- image scenes --------------------------------------------------------------------------------

CELLS = ("top left", "top right", "bottom left", "bottom right")


def object_scene(rng, size, shape=None, color=None) -> Scene:
    """One large shape, centred: the tiny vision tower (8 px patches) sees a different pattern per shape."""
    shape, color = _or_pick(rng, shape, SHAPES), _or_pick(rng, color, COLORS)
    image, draw = _canvas(size)
    _shape(draw, shape, size / 2 + rng.integers(-1, 2), size / 2 + rng.integers(-1, 2), size * 0.42, color)
    return Scene(image, _caption(rng, f"a {color} {shape}", f"{color} {shape}", f"{shape}, {color}",
                                 f"the {shape} is {color}"))


def grid_scene(rng, size, count=None, present=None, absent=None) -> Scene:
    """1-4 shapes in the cells of a 2x2 grid; `present` must be among their colours, `absent` must not."""
    count = int(count) if count is not None else int(rng.integers(1, 5))
    colors = [_pick(rng, COLORS, exclude=(absent,)) for _ in range(count)]
    if present is not None:
        colors[int(rng.integers(count))] = present
    cells = sorted(_pick(rng, range(4), k=count))
    image, draw = _canvas(size)
    parts = []
    for cell, color in zip(cells, colors, strict=True):
        shape = _pick(rng, SHAPES)
        _shape(draw, shape, (cell % 2 + 0.5) * size / 2, (cell // 2 + 0.5) * size / 2, size / 6, color)
        parts.append(f"a {color} {shape} at the {CELLS[cell]}")
    listed = " and ".join(parts)
    return Scene(image, _caption(rng, listed, f"{NUMBER_WORDS[count - 1]} shapes: {listed}",
                                 f"{', '.join(sorted(set(colors)))} shapes"))


# --- video scenes --------------------------------------------------------------------------------

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TAMPERINGS = {"original": "", "masking": ", some frames are black", "repetition": ", some frames repeat",
              "substitution": ", another object shows up for a moment", "dropping": ", the object jumps ahead",
              "rotate": ", some frames are upside down"}


def _moving(rng, size: int, n: int, direction: str, shape_: str, color: str,
            trail: bool = False) -> list[np.ndarray]:
    """An object crossing the frame in `direction` over n frames, optionally leaving a pale trail."""
    dx, dy = DIRECTIONS[direction]
    across = size / 2 + rng.integers(-size // 8, size // 8 + 1)
    centres = [(size / 2 + dx * t if dx else across, size / 2 + dy * t if dy else across)
               for t in np.linspace(-size * 0.33, size * 0.33, n)]
    frames = []
    for i, (x, y) in enumerate(centres):
        past = [("circle", px, py, size / 12, f"pale {color}") for px, py in centres[:i]] if trail else []
        frames.append(_frame(size, [*past, (shape_, x, y, size / 5, color)]))
    return frames


def motion_clip(rng, size, direction=None, shape=None, color=None) -> Scene:
    direction, shape, color = (_or_pick(rng, direction, DIRECTIONS), _or_pick(rng, shape, SHAPES),
                               _or_pick(rng, color, COLORS))
    # The trail (a motion cue, like motion blur) keeps the direction within reach of the tiny models.
    frames = _moving(rng, size, int(_pick(rng, CLIP_LENGTHS)), direction, shape, color, trail=True)
    return Scene(frames, _caption(rng, f"a {color} {shape} moves {direction}", f"{direction}: a {color} {shape}",
                                  f"{color} {shape} moving {direction}", f"{shape}, {color}, moving {direction}"))


def resize_clip(rng, size, change=None) -> Scene:
    change, shape, color = _or_pick(rng, change, ("growing", "shrinking")), _pick(rng, SHAPES), _pick(rng, COLORS)
    radii = np.linspace(size * 0.08, size * 0.42, int(_pick(rng, CLIP_LENGTHS)))
    radii = radii if change == "growing" else radii[::-1]
    frames = [_frame(size, [(shape, size / 2, size / 2, r, color)]) for r in radii]
    return Scene(frames, _caption(rng, f"a {color} {shape} {'grows' if change == 'growing' else 'shrinks'}",
                                  f"{change} {color} {shape}", f"{color} {shape}, {change}"))


def tamper_clip(rng, size, tampering=None) -> Scene:
    tampering = _or_pick(rng, tampering, TAMPERINGS)
    n = int(_pick(rng, CLIP_LENGTHS))
    span = max(2, n // 3)
    direction, color = _pick(rng, ("left", "right")), _pick(rng, COLORS)
    frames = _moving(rng, size, n + (span if tampering == "dropping" else 0), direction, "square", color)
    start = int(rng.integers(span, n - span + 1))
    if tampering == "masking":
        frames[start:start + span] = [np.zeros_like(f) for f in frames[start:start + span]]
    elif tampering == "repetition":
        frames[start:start + span] = frames[start - span:start]
    elif tampering == "substitution":
        other = _moving(rng, size, n, _pick(rng, DIRECTIONS), _pick(rng, SHAPES, exclude=("square",)),
                        _pick(rng, COLORS, exclude=(color,)))
        frames[start:start + span] = other[start:start + span]
    elif tampering == "dropping":
        del frames[start:start + span]
    elif tampering == "rotate":
        frames[start:start + span] = [np.ascontiguousarray(np.rot90(f, 2)) for f in frames[start:start + span]]
    return Scene(frames, f"a {color} square moves {direction}{TAMPERINGS[tampering]}")


def appear_clip(rng, size, first=None) -> Scene:
    """Empty, then a shape of colour `first`, then one of another colour in its place."""
    first = _or_pick(rng, first, COLORS)
    second = _pick(rng, COLORS, exclude=(first,))
    shapes = _pick(rng, SHAPES), _pick(rng, SHAPES)
    n = int(_pick(rng, CLIP_LENGTHS))
    frames = [_frame(size, [] if t < n // 4 else
                     [(shapes[0] if t < n // 2 else shapes[1], size / 2, size / 2, size / 4,
                       first if t < n // 2 else second)]) for t in range(n)]
    return Scene(frames, _caption(rng, f"a {first} {shapes[0]} appears, then a {second} {shapes[1]}",
                                  f"{first} then {second}", f"first {first}, then {second}"))


def change_clip(rng, size, start=None, end=None) -> Scene:
    """The background changes colour once, a third to half-way through."""
    start = _or_pick(rng, start, COLORS, exclude=(end,))
    end = _or_pick(rng, end, COLORS, exclude=(start,))
    n = int(_pick(rng, CLIP_LENGTHS))
    change = int(rng.integers(n // 3, n // 2 + 1))
    frames = [_frame(size, [], COLORS[start if t < change else end]) for t in range(n)]
    return Scene(frames, _caption(rng, f"the background turns from {start} to {end}", f"{start} to {end}",
                                  f"{start} background, then {end}"))


# --- text ----------------------------------------------------------------------------------------

GROUPS = {"animal": ("cat", "dog", "cow", "pig"), "fruit": ("apple", "pear", "grape", "lemon"),
          "vehicle": ("car", "bus", "train", "boat")}
NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva")
ITEMS = ("apple", "ball", "book", "coin", "cup", "pen")
POSITIVE = ("great", "good", "lovely", "fun", "wonderful", "nice")
NEGATIVE = ("bad", "awful", "boring", "terrible", "poor", "dull")
SUBJECTS = ("the movie", "the food", "the trip", "the book", "the show", "the game")
ADVERBS = ("", "very ", "really ", "quite ")
SYNONYMS = {"big": "large", "small": "little", "quick": "fast", "happy": "glad", "angry": "mad",
            "quiet": "silent"}
NOUNS = ("dog", "cat", "boy", "girl", "bird", "man")
VERBS = ("runs", "sleeps", "eats", "jumps", "sings", "reads")


def _sentence(rng) -> list[str]:
    """A grammatical sentence: the <adjective> <noun> <verb>."""
    return ["the", _pick(rng, SYNONYMS), _pick(rng, NOUNS), _pick(rng, VERBS)]


def _review(rng, positive: bool) -> str:
    return f"{_pick(rng, SUBJECTS)} was {_pick(rng, ADVERBS)}{_pick(rng, POSITIVE if positive else NEGATIVE)}"


def compare(rng, label, size):
    small, large = sorted(_pick(rng, range(1, 21), k=2))
    values = [large, small] if label == "A" else [small, large]
    return _choice_question("Which number is larger?", [str(v) for v in values]), Scene(None, "")


def word_group(rng, label, size):
    group, other = _pick(rng, GROUPS, k=2)
    words = [_pick(rng, GROUPS[other])]
    words.insert(LETTERS.index(label), _pick(rng, GROUPS[group]))
    return _choice_question(f"Which word is a {group}?", words), Scene(None, "")


def arithmetic(rng, label, size):
    total = int(label)
    a = int(rng.integers(max(1, total - 5), min(5, total - 1) + 1))
    name, item = _pick(rng, NAMES), _pick(rng, ITEMS)
    return (f"{name} has {a} {item}s and gets {total - a} more. How many {item}s does {name} have?",
            Scene(None, ""))


def sentiment(rng, label, size):
    return f"Review: {_review(rng, label == 'positive')}. Is this review positive or negative?", Scene(None, "")


def paraphrase(rng, label, size):
    _, adjective, noun, verb = _sentence(rng)
    first = f"the {adjective} {noun} {verb}"
    if label == "yes":  # same words, or the adjective swapped for its synonym
        second = f"the {SYNONYMS[adjective] if rng.random() < 0.5 else adjective} {noun} {verb}"
    else:  # one of adjective / noun / verb changed in meaning
        slot = int(rng.integers(3))
        adjective = _pick(rng, SYNONYMS, exclude=(adjective,)) if slot == 0 else adjective
        noun = _pick(rng, NOUNS, exclude=(noun,)) if slot == 1 else noun
        verb = _pick(rng, VERBS, exclude=(verb,)) if slot == 2 else verb
        second = f"the {adjective} {noun} {verb}"
    return f"Do these mean the same? 1: {first}. 2: {second}. Answer yes or no.", Scene(None, "")


def grammar(rng, label, size):
    words = _sentence(rng)
    if label == "unacceptable":  # the same words in a wrong order
        order = rng.permutation(4)
        while list(order) == [0, 1, 2, 3]:
            order = rng.permutation(4)
        words = [words[i] for i in order]
    return f"Is this sentence acceptable or unacceptable? {' '.join(words)}.", Scene(None, "")


def passage(rng) -> tuple[str, str]:
    """Generic text for pretraining: a sentence on the text tasks' world, cut in two (prompt, continuation).
    It states facts (which number is larger, which word is an animal, sums, what a review felt like, what
    words mean) in prose, never the benchmark's questions or answer formats."""
    small, large = sorted(_pick(rng, range(1, 21), k=2))
    group = _pick(rng, GROUPS)
    name, item = _pick(rng, NAMES), _pick(rng, ITEMS)
    a, b = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    positive = bool(rng.random() < 0.5)
    adjective = _pick(rng, SYNONYMS)
    words = _sentence(rng)
    shuffled = [words[i] for i in rng.permutation(len(words))]
    sentences = (
        f"{large} is larger than {small} and {small} is smaller than {large}.",
        f"a {_pick(rng, GROUPS[group])} is a kind of {group}.",
        f"{name} had {a} {item}s and got {b} more, so now {name} has {a + b} {item}s.",
        f"{_review(rng, positive)}, so I {'liked' if positive else 'did not like'} it: a "
        f"{'positive' if positive else 'negative'} review.",
        f"{adjective} means about the same as {SYNONYMS[adjective]}.",
        f"{' '.join(words)} is an acceptable sentence, but {' '.join(shuffled)} is unacceptable."
        if shuffled != words else f"{' '.join(words)} is an acceptable sentence.",
    )
    words = _pick(rng, sentences).split()
    cut = int(rng.integers(1, len(words)))
    return f"{CONTINUE} {' '.join(words[:cut])}", " ".join(words[cut:])


# --- the tasks -----------------------------------------------------------------------------------

def _asking(question: str | Callable[[np.random.Generator, str], str], scene: Callable, key: str) -> Callable:
    """A task that asks `question` about `scene`, drawn with its `key` fixed to the label."""
    def make(rng, label, size):
        text = question(rng, label) if callable(question) else question
        return text, scene(rng, size, **{key: label})
    return make


def _has_color(rng, label, size):
    color = _pick(rng, COLORS)
    scene = grid_scene(rng, size, **({"present": color} if label == "yes" else {"absent": color}))
    return f"Is there a {color} shape? Answer yes or no.", scene


def _scene_start(rng, label, size):
    return "The background changes color. What was the first color?", change_clip(rng, size, start=label)


COUNTS = ("1", "2", "3", "4")
TASKS = (
    Task("count", "image", COUNTS, _asking("How many shapes are there?", grid_scene, "count"), "grid_scene"),
    Task("has_color", "image", ("yes", "no"), _has_color, "grid_scene"),
    Task("shape", "image", SHAPES, _asking("What shape is this?", object_scene, "shape"), "object_scene"),
    Task("object_color", "image", tuple(COLORS), _asking("What color is this shape?", object_scene, "color"),
         "object_scene"),
    Task("compare", "text", ("A", "B"), compare),
    Task("word_group", "text", ("A", "B"), word_group),
    Task("arithmetic", "text", tuple(str(total) for total in range(2, 11)), arithmetic),
    Task("sentiment", "glue", ("positive", "negative"), sentiment),
    Task("paraphrase", "glue", ("yes", "no"), paraphrase),
    Task("grammar", "glue", ("acceptable", "unacceptable"), grammar),
    Task("tamper_type", "video", tuple(TAMPERINGS),
         _asking(f"Which tampering was applied to the video? Options: {', '.join(TAMPERINGS)}.", tamper_clip,
                 "tampering"), "tamper_clip"),
    Task("grow_shrink", "video", ("growing", "shrinking"),
         _asking("Is the object growing or shrinking?", resize_clip, "change"), "resize_clip"),
    Task("moving_direction", "video", tuple(DIRECTIONS),
         _asking("Which way does the object move? Options: left, right, up, down.", motion_clip, "direction"),
         "motion_clip"),
    Task("moving_color", "video", tuple(COLORS), _asking("What color is the moving object?", motion_clip, "color"),
         "motion_clip"),
    Task("moving_shape", "video", SHAPES, _asking("What shape is the moving object?", motion_clip, "shape"),
         "motion_clip"),
    Task("appear_order", "video", tuple(COLORS), _asking("Which color appears first?", appear_clip, "first"),
         "appear_clip"),
    Task("scene_change", "video", tuple(COLORS),
         _asking("The background changes color. What is the final color?", change_clip, "end"), "change_clip"),
    Task("scene_start", "video", tuple(COLORS), _scene_start, "change_clip"),
)
# The scene kinds of the pretraining mixture: every kind the visual tasks draw from, with random content.
PRETRAINING_SCENES = {"image": (object_scene, grid_scene),
                      "video": (motion_clip, resize_clip, tamper_clip, appear_clip, change_clip)}


# --- generation ----------------------------------------------------------------------------------

def generate(out_dir: str | Path, seed: int = 0, train_per_task: int = 200, test_per_task: int = 200,
             image_size: int = 32, video_size: int = 32) -> Path:
    """Write the benchmark to `out_dir` (dataset/ + media/); the same arguments give the same data."""
    _check_sizes(video_size)
    out_dir = Path(out_dir)
    splits: dict[str, list[dict]] = {TRAIN_SPLIT: []}
    taxonomy = Taxonomy.named("mmt_mini")
    for task in TASKS:
        size = video_size if task.source_type == "video" else image_size
        splits[TRAIN_SPLIT] += _task_rows(task, "train", train_per_task, seed, size, out_dir / MEDIA_DIR)
        splits[taxonomy.split_name(task.name)] = _task_rows(task, "test", test_per_task, seed, size,
                                                            out_dir / MEDIA_DIR)
    _save_splits(out_dir, splits, seed)
    return out_dir


def generate_pretraining(out_dir: str | Path, seed: int, samples: int, image_size: int = 32,
                         video_size: int = 32) -> Path:
    """Write the pretraining mixture (one `train` split of `samples` rows) to `out_dir`: the same number of
    captioned scenes of every kind the visual tasks draw from, and as many text passages as scene kinds."""
    _check_sizes(video_size)
    out_dir = Path(out_dir)
    sources = [(kind, scene) for kind, scenes in PRETRAINING_SCENES.items() for scene in scenes]
    sources.append(("text", None))
    rows = []
    for k, (kind, scene) in enumerate(sources):
        name = "text" if scene is None else scene.__name__
        rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 2])
        for i in range(samples // len(sources) + (k < samples % len(sources))):
            if scene is None:
                question, answer, media = *passage(rng), None
            else:
                drawn = scene(rng, video_size if kind == "video" else image_size)
                question, answer, media = DESCRIBE[kind], drawn.caption, drawn.media
            rows.append({"source_type": kind, "question": question, "answer": answer,
                         "media_path": _save(media, kind, name, "pretrain", i, out_dir / MEDIA_DIR)})
    _save_splits(out_dir, {TRAIN_SPLIT: rows}, seed)
    return out_dir


def _check_sizes(video_size: int) -> None:
    if video_size % 2:
        raise ValueError(f"video_size must be even (MP4 uses 4:2:0 chroma), got {video_size}")


def _save_splits(out_dir: Path, splits: dict[str, list[dict]], seed: int) -> None:
    """save_to_disk with the authors' four columns; the train split shuffled (tasks interleaved)."""
    order = np.random.default_rng([seed, 1]).permutation(len(splits[TRAIN_SPLIT]))
    splits[TRAIN_SPLIT] = [splits[TRAIN_SPLIT][i] for i in order]
    dataset = datasets.DatasetDict({  # the authors' column order
        name: datasets.Dataset.from_list([{key: row[key] for key in FEATURES} for row in rows], features=FEATURES)
        for name, rows in splits.items()})
    with _no_progress_bars():
        dataset.save_to_disk(str(out_dir / DATASET_DIR))


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    # One bar per split (19 of them) would bury the log line that matters.
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _task_rows(task: Task, split: str, n: int, seed: int, size: int, media_root: Path) -> list[dict]:
    # One random stream per (task, split): changing one task or one size leaves the others unchanged.
    rng = np.random.default_rng([seed, zlib.crc32(task.name.encode()), int(split == "test")])
    labels = [task.answers[i % len(task.answers)] for i in rng.permutation(n)]
    rows = []
    for i, label in enumerate(labels):
        question, scene = task.make(rng, label, size)
        rows.append({"source_type": task.source_type, "question": question, "answer": label,
                     "media_path": _save(scene.media, task.source_type, task.name, split, i, media_root)})
    return rows


def _save(media: Any, source_type: str, name: str, split: str, index: int, media_root: Path) -> str:
    if media is None:
        return ""
    kind, suffix = ("images", "png") if source_type == "image" else ("videos", "mp4")
    relative = f"{kind}/{name}/{split}_{index:05d}.{suffix}"
    path = media_root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if source_type == "image":
        media.save(path)
    else:
        write_video(path, media)
    return relative


# --- cache ---------------------------------------------------------------------------------------

def generator_params(cfg: Mapping | None) -> dict[str, int]:
    """The generator arguments of a `data.generate` config section, defaults filled in."""
    given = dict(cfg or {})
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"data.generate: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {key: int(given.get(key, default)) for key, default in DEFAULTS.items()}


def cache_key(params: Mapping[str, Any]) -> str:
    payload = json.dumps({"version": GENERATOR_VERSION, **params}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure(cfg: Mapping) -> Path:
    """The directory of the generated benchmark for a data config, generating it on first use."""
    params = generator_params(cfg.get("generate"))
    return _cached(cfg, params, lambda out: generate(out, **params), "mmt_mini")


def ensure_pretraining(cfg: Mapping, seed: int, samples: int) -> Path:
    """The directory of the pretraining mixture drawn with `seed` (never the benchmark's: the caller checks),
    at the data config's image and video sizes, generating it on first use."""
    params = generator_params(cfg.get("generate"))
    sizes = {"image_size": params["image_size"], "video_size": params["video_size"]}
    key = {"mixture": "pretraining", "seed": int(seed), "samples": int(samples), **sizes}
    return _cached(cfg, key, lambda out: generate_pretraining(out, int(seed), int(samples), **sizes),
                   "the pretraining mixture")


def _cached(cfg: Mapping, params: Mapping[str, Any], write: Callable[[Path], Any], what: str) -> Path:
    root = Path(str(cfg.get("cache_dir") or "~/.cache/lime/mmt_mini")).expanduser() / cache_key(params)
    if (root / COMPLETE).is_file():
        return root
    # Generate beside the final directory and rename, so a half-written copy is never used.
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    write(tmp)
    (tmp / COMPLETE).write_text(json.dumps({"version": GENERATOR_VERSION, **params}))
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / COMPLETE).is_file():
            raise
    logger.info("generated %s in %.1fs: %s", what, time.perf_counter() - start, root)
    return root
