"""Image and video decoding (docs/method.md §6): PIL for images, PyAV for videos.

Every failure is a `MediaError` that names the file, so a bad sample is reported as such instead of
surfacing later as a shape error inside torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image


class MediaError(ValueError):
    """A media file that cannot be used; kind is "missing", "empty" or "corrupt" (truncated included)."""

    def __init__(self, path: Path | str, reason: str, kind: str):
        super().__init__(f"{reason}: {path}")
        self.path, self.reason, self.kind = str(path), reason, kind


def _check_file(path: Path, kind: str) -> None:
    if not path.is_file():
        raise MediaError(path, f"missing {kind} file", "missing")
    if path.stat().st_size == 0:
        raise MediaError(path, f"empty {kind} file", "empty")


def load_image(path: Path | str) -> Image.Image:
    """Decode an image fully (so a truncated file fails here, not in the processor) as RGB."""
    path = Path(path)
    _check_file(path, "image")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports corrupt data with all three
        raise MediaError(path, f"corrupt or truncated image ({err})", "corrupt") from err


FRAME_SAMPLING = ("floor", "round")


def sample_indices(total: int, num_frames: int, sampling: str = "floor") -> list[int]:
    """`num_frames` uniformly spaced frame indices of a `total`-frame clip, i_k = k (total − 1) / (num_frames − 1).

    "floor" is the released code's `np.linspace(0, total - 1, num_frames, dtype=int)` (100 frames: ..., 56, 70,
    84, ...), "round" rounds to the nearest frame instead (..., 57, 71, 85, ...). A clip of at most `num_frames`
    frames keeps all of them, as in the released code (its training loader decodes the distinct indices only).
    """
    if sampling not in FRAME_SAMPLING:
        raise ValueError(f"data.frame_sampling must be one of {FRAME_SAMPLING}, got {sampling!r}")
    if total <= num_frames:
        return list(range(total))
    if sampling == "floor":
        return np.linspace(0, total - 1, num_frames, dtype=int).tolist()
    return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()


def load_video(path: Path | str, num_frames: int = 8, sampling: str = "floor", pad: bool = True) -> np.ndarray:
    """Uniformly sampled RGB frames (`sample_indices`), shape (F, H, W, 3), uint8.

    With `pad`, a clip of fewer than `num_frames` frames is padded to F = num_frames by repeating its last frame
    (the released code does so in evaluation only); without, F is the clip's length.
    """
    path = Path(path)
    _check_file(path, "video")
    try:
        frames = _decode_sampled(path, num_frames, sampling)
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        raise MediaError(path, f"corrupt video ({err})", "corrupt") from err
    if not frames:
        raise MediaError(path, "video has no decodable frames", "empty")
    if pad:
        frames += [frames[-1]] * (num_frames - len(frames))
    return np.stack(frames)


def _decode_sampled(path: Path, num_frames: int, sampling: str) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        if container.format.name.endswith("_pipe") or container.format.name == "image2":
            raise ValueError(f"a still image ({container.format.name}), not a video")
        stream = container.streams.video[0]
        total = stream.frames or _count_frames(container, stream)
    wanted = sample_indices(total, num_frames, sampling)
    if not wanted:
        return []
    frames, last = [], None
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            last = frame
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if i >= wanted[-1]:
                break
    # Container metadata can over-count frames; the missing tail is padded with the true last frame.
    if last is not None and len(frames) < len(wanted):
        frames += [last.to_ndarray(format="rgb24")] * (len(wanted) - len(frames))
    return frames


def _count_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Frame count from the packets (no decoding) for containers that do not store it."""
    return sum(1 for packet in container.demux(stream) if packet.size > 0)


def write_video(path: Path | str, frames: Sequence[np.ndarray], fps: int = 8) -> None:
    """Encode RGB uint8 frames (H, W even) as an MP4, near-lossless so small coloured shapes survive."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"} if codec == "libx264" else {"qscale": "2"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())
