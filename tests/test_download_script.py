"""scripts/download_mmt47.sh without a network: the interpreter check and the archive extraction.

The hub calls are replaced by a wrapper interpreter that turns `snapshot_download` into a no-op and runs
everything else (the zip extraction) with this test's own Python, so the script's own steps are exercised.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "download_mmt47.sh"


def run_script(data_root: Path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT), str(data_root)], env=env, capture_output=True, text=True,
                          timeout=120)


def offline_python(tmp_path: Path) -> str:
    """An interpreter whose hub downloads do nothing (the files are put in place by the test)."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f"""#!/usr/bin/env bash
case "$*" in *snapshot_download*) exit 0 ;; esac
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    return str(wrapper)


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_an_interpreter_without_datasets_is_refused_with_the_fix(tmp_path):
    result = run_script(tmp_path / "mmt47", str(tmp_path / "no-such-python"))
    assert result.returncode == 1
    assert "cannot import datasets" in result.stderr and "scripts/setup.sh" in result.stderr
    assert not (tmp_path / "mmt47").exists()  # nothing created before the check


@pytest.mark.slow
def test_archives_are_extracted_once_next_to_themselves(tmp_path):
    data_root = tmp_path / "mmt47"
    (data_root / "dataset").mkdir(parents=True)
    (data_root / "dataset" / "dataset_dict.json").write_text('{"splits": ["train"]}')  # metadata already there
    write_zip(data_root / "media" / "images.zip", {"images/caltech101/0.png": b"png"})
    write_zip(data_root / "media" / "videos" / "video" / "clips.zip", {"a.mp4": b"mp4"})
    python = offline_python(tmp_path)

    first = run_script(data_root, python)
    assert first.returncode == 0, first.stderr
    assert (data_root / "media" / "images" / "caltech101" / "0.png").read_bytes() == b"png"
    assert (data_root / "media" / "videos" / "video" / "clips" / "a.mp4").read_bytes() == b"mp4"
    assert f"data.path={data_root}/dataset data.media_root={data_root}/media" in first.stdout

    second = run_script(data_root, python)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("skip ") == 2 and "extract " not in second.stdout
