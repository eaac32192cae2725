#!/usr/bin/env bash
# Download MMT-47 (needs internet and ~the dataset's size of disk), following the paper release's steps:
#   bash scripts/download_mmt47.sh [ROOT]          (ROOT defaults to data/mmt47)
#   .venv/bin/python scripts/prepare_data.py data=mmt47 data.path=ROOT/dataset data.media_root=ROOT/media +scan=true
# Result: ROOT/dataset (DatasetDict.save_to_disk of Kowsher/MMT-47) and ROOT/media/{images,videos}, the
# root that every row's media_path is relative to. Re-running skips what is already there.
# Everything runs through the project's own interpreter (.venv/bin/python from scripts/setup.sh; no activation
# needed, and no `hf` or `unzip` on PATH); set PYTHON=... to use another one that has `datasets` installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${1:-data/mmt47}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
if ! "$PYTHON" -c "import datasets, huggingface_hub" 2>/dev/null; then
  echo "error: $PYTHON cannot import datasets and huggingface_hub; run 'bash scripts/setup.sh' first" \
       "(it creates .venv), or set PYTHON=/path/to/python of an environment that has them" >&2
  exit 1
fi
mkdir -p "$ROOT/media"

# repo_id, pattern, target: one dataset folder of the hub into a local folder (resumable, skips what is there).
hub_download() {
  "$PYTHON" -c "import sys, huggingface_hub
huggingface_hub.snapshot_download(sys.argv[1], repo_type='dataset', allow_patterns=[sys.argv[2]], local_dir=sys.argv[3])" \
    "$1" "$2" "$3"
}

if [ ! -f "$ROOT/dataset/dataset_dict.json" ]; then
  echo "== metadata: Kowsher/MMT-47 -> $ROOT/dataset"
  "$PYTHON" -c "import sys, datasets; datasets.load_dataset('Kowsher/MMT-47').save_to_disk(sys.argv[1])" \
    "$ROOT/dataset"
fi

echo "== images: Kowsher/MMT-47 images/ -> $ROOT/media"
hub_download Kowsher/MMT-47 "images/*" "$ROOT/media"

echo "== videos: Srikant86/MVTamperBench video/ -> $ROOT/media/videos"
hub_download Srikant86/MVTamperBench "video/*" "$ROOT/media/videos"

# Each archive is extracted next to itself, into a folder named after it (as the release does).
find "$ROOT/media" -name "*.zip" -print0 | while IFS= read -r -d "" archive; do
  target="${archive%.zip}"
  if [ "$(basename "$archive")" = "images.zip" ]; then
    target="$(dirname "$archive")"  # images.zip holds the images/ tree itself
  fi
  if [ -e "$target/.extracted" ]; then
    echo "skip $archive (already extracted)"
  else
    echo "extract $archive"
    "$PYTHON" -m zipfile -e "$archive" "$target" && touch "$target/.extracted"
  fi
done
echo "done: data.path=$ROOT/dataset data.media_root=$ROOT/media"
