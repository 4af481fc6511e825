#!/usr/bin/env bash
# Build .device/kit.tar.xz: the Python packages ser_ray needs that the lent GPU machine's image
# lacks (Ray, datasets, librosa, soundfile, soxr, optuna, opensmile and what they pull in), for
# its Python 3.12, at the versions of this checkout's .venv. That machine reaches no package
# index and takes at most 64 MiB of files per call; Ray's wheel alone is 76 MiB, 31 of them a
# Java jar we never load, so the kit is an unpacked, trimmed site folder compressed with xz
# (~40 MiB). Run it here (it needs PyPI), then on the machine: tools/device/check.sh.
#
#   bash tools/device/build_kit.sh   # -> .device/kit.tar.xz (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=.venv/bin/python
IMAGE_LIST=${IMAGE_LIST:-/work/.library/device/KINDS.md}  # the machine image's package names
KIT=.device
rm -rf "$KIT/wheels" "$KIT/site" "$KIT/kit.tar.xz"
mkdir -p "$KIT/wheels"

version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
wanted="ray[data,train,tune,default]==$(version ray) datasets==$(version datasets)"
for name in librosa soundfile soxr optuna opensmile; do wanted+=" $name==$(version $name)"; done
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_5; do
  platforms+=(--platform "${p}_x86_64")
done
target=(--only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}")
python3 -m pip download -q "${target[@]}" --platform any -d "$KIT/wheels" $wanted

# Leave out what the image has (its list of package names) and what our jobs never import
# (Ray's profiler, virtualenv for pip runtime environments).
"$PYTHON" - "$IMAGE_LIST" "$KIT/wheels" <<'PY'
import pathlib, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
listing = [l for l in pathlib.Path(sys.argv[1]).read_text().splitlines() if "Packages: absl-py" in l]
if not listing:
    sys.exit(f"{sys.argv[1]}: no 'Packages: ...' line naming the image's packages")
on_image = {norm(n.strip(" .")) for n in listing[0].split("Packages:")[1].split(",")}
unused = {"py-spy", "virtualenv", "distlib", "python-discovery"}
for wheel in pathlib.Path(sys.argv[2]).glob("*.whl"):
    if norm(wheel.name.split("-")[0]) in on_image | unused:
        wheel.unlink()
PY
python3 -m pip install -q --no-deps --no-compile "${target[@]}" --platform any \
  --target "$KIT/site" "$KIT"/wheels/*.whl
rm -rf "$KIT/site/ray/jars" "$KIT/site/ray/rllib" "$KIT/site/ray/llm"
find "$KIT/site" -name "*.map" -delete
find "$KIT/site" -name __pycache__ -prune -exec rm -rf {} +
tar -cJf "$KIT/kit.tar.xz" -C "$KIT/site" .
rm -rf "$KIT/wheels" "$KIT/site"
echo "$KIT/kit.tar.xz: $(du -m "$KIT/kit.tar.xz" | cut -f1) MiB"
