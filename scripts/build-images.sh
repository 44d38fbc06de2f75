#!/usr/bin/env bash
# Build the operator and trainer images (`make images`) from the repository's two Dockerfiles, unchanged:
#
#   ghcr.io/kubetune/kubetune-operator:<appVersion>   from Dockerfile
#   ghcr.io/kubetune/kubetune-trainer:<appVersion>    from trainer-image/Dockerfile
#
# No image registry is needed. The base is built here with mmdebstrap (Debian bookworm minbase with python3.11
# and venv, the Debian and Python of python:3.11-slim-bookworm) and passed as BASE_IMAGE. pip installs from a
# wheelhouse under ~/.cache/kubetune, mounted into the build (PIP_FIND_LINKS, PIP_NO_INDEX), so torch and its
# CUDA wheels are downloaded once per machine; the DeepSpeed wheel with its CPU ops that `make install` built
# (scripts/install-deepspeed.sh) is mounted too, so it is compiled once per machine. podman builds with chroot
# isolation, which needs neither cgroups nor user namespaces.
#
# usage: scripts/build-images.sh [operator] [trainer]     (both when none is named)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-.venv/bin/python}
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/kubetune/Chart.yaml)
base=${KUBETUNE_BASE_IMAGE:-localhost/kubetune-base:bookworm-python3.11}
images=("$@")
[[ ${#images[@]} -gt 0 ]] || images=(operator trainer)

say() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*"; }

if ! podman image exists "$base"; then
  say "building the base $base with mmdebstrap"
  # The machine's own extra CA certificates (a proxy's) are trusted inside the base too.
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"' \
    --customize-hook='find /usr/local/share/ca-certificates -maxdepth 1 -name "*.crt" -exec cp {} "$1/usr/local/share/ca-certificates/" \;' \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm - | podman import --quiet - "$base" >/dev/null
fi

# Every wheel both images install, for this machine's platform; kept until pyproject.toml or constraints.txt
# changes (the marker is named after their hash).
wheelhouse=$cache/wheelhouse
stamp=$wheelhouse/.complete-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [[ ! -f $stamp ]]; then
  say "filling the wheelhouse $wheelhouse"
  mkdir -p "$wheelhouse"
  PIP_FIND_LINKS="$wheelhouse" "$python" -m pip download --quiet -d "$wheelhouse" -c constraints.txt \
    -r <("$python" scripts/requirements.py pyproject.toml operator trainer) \
    setuptools==84.2.1 ninja hjson msgpack py-cpuinfo einops
  rm -f "$wheelhouse"/.complete-*
  touch "$stamp"
fi

# The DeepSpeed wheel with CPU Adam and the shared-memory comm op, built once (make install does it too).
mkdir -p "$cache/wheels"
KUBETUNE_CACHE=$cache scripts/install-deepspeed.sh .venv

build() {  # build NAME DOCKERFILE
  local tag="ghcr.io/kubetune/kubetune-$1:$version" started=$SECONDS
  say "building $tag from $2"
  podman build --isolation=chroot --layers --quiet \
    --build-arg BASE_IMAGE="$base" \
    --build-arg PIP_FIND_LINKS=/wheelhouse --build-arg PIP_NO_INDEX=1 \
    --build-arg KUBETUNE_CACHE=/kubetune-cache \
    --volume "$wheelhouse:/wheelhouse:ro" \
    --volume "$cache/wheels:/kubetune-cache/wheels" \
    -f "$2" -t "$tag" . >/dev/null
  say "built $tag in $((SECONDS - started)) s, $(podman image inspect --format '{{.Size}}' "$tag" | numfmt --to=si)B"
}

for image in "${images[@]}"; do
  case $image in
    operator) build operator Dockerfile ;;
    trainer) build trainer trainer-image/Dockerfile ;;
    *) echo "unknown image $image (operator, trainer)" >&2; exit 2 ;;
  esac
done
# Layers no tag uses any more (the previous build of a changed step) go, so repeated builds do not fill the disk.
podman image prune --force >/dev/null
