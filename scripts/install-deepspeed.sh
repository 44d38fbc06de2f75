#!/usr/bin/env bash
# Install DeepSpeed into a virtual environment with its CPU ops compiled ahead of time.
#
# Compiled at first use instead, the shared-memory comm op and CPU Adam cost ~95 s in every fresh
# process tree and fail hard without a compiler. The wheel is built once (DS_BUILD_* flags), kept
# under ~/.cache/kubetune/wheels, and reused. --no-build-isolation builds against the torch already
# installed instead of pulling a second one into an isolated build environment.
set -euo pipefail

venv=${1:?usage: install-deepspeed.sh VENV}
# The version is pinned in constraints.txt like every other package.
constraints=$(dirname "$0")/../constraints.txt
version=${DEEPSPEED_VERSION:-$(sed -n 's/^deepspeed==//p' "$constraints")}
wheels=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/wheels
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
marker="$wheels/deepspeed-$version-torch$torch_version.built"

if "$venv/bin/python" -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '$version')" 2>/dev/null; then
  exit 0
fi
mkdir -p "$wheels"
if [[ ! -f $marker ]]; then
  echo "building deepspeed $version wheel with CPU Adam and shared-memory comm (once, ~3 min)"
  rm -f "$wheels"/deepspeed-"$version"-*.whl
  "$venv/bin/pip" install -q -c "$constraints" ninja hjson msgpack py-cpuinfo einops
  DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 \
    "$venv/bin/pip" wheel -q --no-deps --no-build-isolation "deepspeed==$version" -w "$wheels"
  touch "$marker"
fi
"$venv/bin/pip" install -q -c "$constraints" --no-build-isolation "$wheels"/deepspeed-"$version"-*.whl
