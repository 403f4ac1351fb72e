#!/usr/bin/env bash
# The wheel as a user installs it: build kissray's wheel, pip install it into a clean Python 3.11 venv
# with requirements.lock as constraints (pip resolves the wheel's declared dependencies, held to the
# locked versions), then `kissray --help` and `kissray score` on a small generated film, run outside
# the checkout so nothing is imported from it. A step of .ci/run (minutes: not a pytest test).
#   cluster/wheel_check.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3.11}
work=$(mktemp -d "${TMPDIR:-/tmp}/kissray-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

"$python" -m pip wheel --no-deps --quiet -w "$work/dist" .
"$python" -m venv "$work/venv"
# pip takes no hashes in a constraints file: the pins alone (the hashes were checked by make venv,
# and pip's cache serves the same files).
sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' requirements.lock > "$work/constraints.txt"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$work/constraints.txt" "$work"/dist/kissray-*.whl
"$work/venv/bin/python" -m pip check

cd "$work"  # away from the checkout: kissray comes from the installed wheel
kissray=("$work/venv/bin/kissray")
"${kissray[@]}" --help > /dev/null
"$work/venv/bin/python" - <<'PY'
import kissray, sys
assert "/venv/" in kissray.__file__, kissray.__file__  # the wheel, not the checkout
from kissray.media.ffmpeg import run_ffmpeg
run_ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=160x90:rate=25:duration=4", "-f", "lavfi",
            "-i", "sine=frequency=440:duration=4", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
            "-shortest", "film.mp4"])
PY
"${kissray[@]}" init --out ck --image-size 64
"${kissray[@]}" score film.mp4 --model ck --out out --no-progress
"$work/venv/bin/python" - <<'PY'
import pandas as pd
titles = pd.read_parquet("out/titles")
assert list(titles.status) == ["ok"] and int(titles.n_scored[0]) == 4, titles.to_dict("records")
print("wheel check: kissray --help and kissray score on a 4-s film from the installed wheel: ok")
PY
