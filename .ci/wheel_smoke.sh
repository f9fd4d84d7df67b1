#!/usr/bin/env bash
# The wheel, as a user gets it: build it from this checkout, install it into a fresh virtual
# environment that cannot see the checkout (a plain venv, run from a temporary folder), then list
# the methods and train SimCLR for one epoch from it. Run by .ci/run after the tests: about two
# minutes after the editable install (its objects in build/ext-objects/ are reused), plus the C++
# build (minutes) otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

python3 -m pip wheel -q --no-build-isolation --no-deps -w "$tmp/dist" "$root"
python3 -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
# torch first, pinned: the wheel's torch>=2.4 is then satisfied and pip pulls no CUDA torch.
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q "$tmp"/dist/fastcl-*.whl

cd "$tmp"   # outside the checkout: nothing can be imported from the source tree
"$py" - "$tmp/venv" <<'PY'
import sys, torch, fastcl, fastcl._C, fastcl.kernels, fastcl.methods
assert fastcl.__file__.startswith(sys.argv[1]), f"fastcl imported from {fastcl.__file__}"
assert torch.__version__ == "2.13.0+cpu", f"torch {torch.__version__} in the venv"
PY
"$tmp/venv/bin/fastcl" list
"$tmp/venv/bin/fastcl" train simclr --epochs 1 --out "$tmp/run" --no-progress
test -s "$tmp/run/metrics.json"
"$py" -c "import json, sys; m = json.load(open(sys.argv[1])); print('wheel smoke:', m)" "$tmp/run/metrics.json"
