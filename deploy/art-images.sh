#!/bin/sh
# Puts the art family's images in DIR (default data/art): the sample photographs and
# textures that scikit-image 0.26.0 ships in its wheel on PyPI, copied out of it as they
# are (PNG and JPEG files named like `astronaut.png`, `ihc.png`, `hubble_deep_field.jpg`).
# Needs python3 with pip and the network to PyPI; installs nothing.
#
# The images l2l's recipes use and their licences (scikit-image's skimage/data notes):
#   astronaut, rocket, hubble_deep_field  NASA / SpaceX, public domain
#   coffee, chelsea, camera              CC0 (Rachel Michetti, Stefan van der Walt,
#                                         Lav Varshney)
#   ihc                                  immunohistochemistry, CMMI; no known copyright
#                                         restrictions
#   brick, gravel                        CC0 Textures, CC0
set -eu
dir="${1:-data/art}"
version="0.26.0"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# One wheel for every machine (the images are the same in all of them).
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" \
    --python-version 3.11 --implementation cp --platform manylinux_2_28_x86_64 \
    "scikit-image==$version"
mkdir -p "$dir"
python3 - "$tmp" "$dir" <<'PY'
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("scikit_image-*.whl"))
n = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        p = pathlib.PurePosixPath(name)
        if p.parent == pathlib.PurePosixPath("skimage/data") and p.suffix in (".png", ".jpg"):
            (dst / p.name).write_bytes(z.read(name))
            n += 1
print(f"{n} images from {wheel.name} in {dst}")
PY
