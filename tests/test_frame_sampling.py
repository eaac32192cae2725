"""Video frames sampled as the released code samples them: floor indices, short clips padded in evaluation only."""

import datasets
import numpy as np
import pytest

from lime.data.dataset import MMTDataset
from lime.data.media import load_video, sample_indices, write_video


def grey_clip(n: int) -> list[np.ndarray]:
    """Frame i is uniformly grey at level 10 * i, so decoded frames tell which frame they are."""
    return [np.full((32, 32, 3), 10 * i, dtype=np.uint8) for i in range(n)]


def frame_ids(frames: np.ndarray) -> list[int]:
    return np.rint(frames.reshape(len(frames), -1).mean(axis=1) / 10).astype(int).tolist()


def test_floor_is_the_default_and_matches_the_released_code():
    assert sample_indices(100, 8) == [0, 14, 28, 42, 56, 70, 84, 99]
    assert sample_indices(100, 8, "round") == [0, 14, 28, 42, 57, 71, 85, 99]
    for total in range(8, 300):
        assert sample_indices(total, 8) == np.linspace(0, total - 1, 8, dtype=int).tolist()
    # a short clip keeps its frames, which are exactly the distinct indices the released training loader decodes
    for total in range(1, 8):
        assert sample_indices(total, 8) == sorted(set(np.linspace(0, total - 1, 8, dtype=int).tolist()))
    with pytest.raises(ValueError, match="frame_sampling"):
        sample_indices(100, 8, "nearest")


def test_decoded_frames_follow_the_sampling(tmp_path):
    write_video(tmp_path / "clip.mp4", grey_clip(24))
    assert frame_ids(load_video(tmp_path / "clip.mp4")) == [0, 3, 6, 9, 13, 16, 19, 23]
    assert frame_ids(load_video(tmp_path / "clip.mp4", sampling="round")) == [0, 3, 7, 10, 13, 16, 20, 23]


def video_split(tmp_path) -> datasets.Dataset:
    write_video(tmp_path / "short.mp4", grey_clip(5))
    write_video(tmp_path / "long.mp4", grey_clip(24))
    return datasets.Dataset.from_dict({
        "source_type": ["video", "video"], "media_path": ["short.mp4", "long.mp4"],
        "question": ["q", "q"], "answer": ["a", "a"]})


@pytest.mark.parametrize(("split", "pad", "short_frames"), [
    ("train", "eval", [0, 1, 2, 3, 4]),                    # released training: the clip's own frames
    ("video_test_x", "eval", [0, 1, 2, 3, 4, 4, 4, 4]),    # released evaluation: padded with the last frame
    ("train", "always", [0, 1, 2, 3, 4, 4, 4, 4]),
])
def test_short_clips_are_padded_in_evaluation_only_by_default(tmp_path, split, pad, short_frames):
    rows = video_split(tmp_path)
    dataset = MMTDataset(rows, split, tmp_path, pad_short_clips=pad)
    assert frame_ids(dataset[0].video) == short_frames
    assert frame_ids(dataset[1].video) == [0, 3, 6, 9, 13, 16, 19, 23]  # long clips: never padded, floor
    rounded = MMTDataset(rows, split, tmp_path, frame_sampling="round", pad_short_clips=pad)
    assert frame_ids(rounded[1].video) == [0, 3, 7, 10, 13, 16, 20, 23]
    with pytest.raises(ValueError, match="pad_short_clips"):
        MMTDataset(rows, split, tmp_path, pad_short_clips="train")
