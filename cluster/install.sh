#!/usr/bin/env bash
# Install kissray exactly as tested: the locked set (every package pinned, hashes checked), then
# kissray itself with no dependency resolution. The one install step of `make venv` (CI) and of
# cluster/Dockerfile, so a broken install fails CI before it reaches a cluster.
#
#   cluster/install.sh PYTHON LOCKFILE editable DIR     # make venv: .venv/bin/python requirements-test.lock editable .
#   cluster/install.sh PYTHON LOCKFILE wheel WHEEL      # the image: python requirements.lock wheel kissray-*.whl
set -euo pipefail
python=${1:?python} lock=${2:?lock file} how=${3:?editable or wheel} what=${4:?directory or wheel}

pip=("$python" -m pip --disable-pip-version-check)
# --no-deps: the lock is complete (make lock resolves it); nothing may be added or upgraded here.
"${pip[@]}" install --require-hashes --no-deps -r "$lock"
case "$how" in
  editable) "${pip[@]}" install --no-deps -e "$what" ;;
  wheel) "${pip[@]}" install --no-deps "$what" ;;
  *) echo "install.sh: third argument must be 'editable' or 'wheel', not '$how'" >&2; exit 2 ;;
esac
# The installed set must be consistent: a lock that misses a dependency fails here, not at run time.
"${pip[@]}" check
