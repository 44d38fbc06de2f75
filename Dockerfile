# The kubetune operator: the controller that turns FineTuneJobs into PyTorchJobs.
# It needs no GPU and no training stack: only kubetune[operator] (kubernetes, prometheus-client, pydantic-settings),
# pinned by the same constraints.txt that `make test` installs from.
#
#   docker build -t ghcr.io/kubetune/kubetune-operator:0.1.0 .
#   docker run --rm ghcr.io/kubetune/kubetune-operator:0.1.0 --help
#
# `make images` builds this same file with BASE_IMAGE set to a local Debian bookworm base of the same Python
# (scripts/build-images.sh) and PIP_FIND_LINKS/PIP_NO_INDEX set to a wheelhouse mounted into the build.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# A fixed numeric UID/GID so `runAsNonRoot: true` can be checked by the kubelet without reading /etc/passwd.
RUN groupadd --system --gid 65532 kubetune \
    && useradd --system --uid 65532 --gid kubetune --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kubetune

# Pip options for the build only (a wheelhouse instead of the index); unset, pip uses the index.
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX

# The dependencies first, in a layer that only pyproject.toml or constraints.txt invalidates; setuptools is what
# the install of kubetune itself builds with (no build isolation, so no download per code change).
WORKDIR /src
COPY pyproject.toml constraints.txt scripts/requirements.py ./
RUN python3 -m venv /opt/venv \
    && python3 requirements.py pyproject.toml operator > requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r requirements.txt setuptools==84.2.1

# Then kubetune itself: a regular (not editable) install, the sources dropped afterwards. The trainer package is
# copied only because the distribution declares it; its dependencies (torch...) are not installed here.
COPY README.md ./
COPY operator ./operator
COPY trainer-image/kubetune_trainer ./trainer-image/kubetune_trainer
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf /src

WORKDIR /
USER 65532:65532

# 8080: Prometheus metrics (KUBETUNE_METRICS_PORT); 8081: the liveness endpoint /healthz (KUBETUNE_HEALTH_PORT).
EXPOSE 8080 8081
ENTRYPOINT ["kubetune", "operator"]
