# The kubetune operator: the controller that turns FineTuneJobs into PyTorchJobs.
# It needs no GPU and no training stack: only kubetune[operator] (kubernetes, prometheus-client, pydantic-settings),
# pinned by the same constraints.txt that `make test` installs from.
#
#   docker build -t kubetune-operator .
#   docker run --rm kubetune-operator --help
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric UID/GID so `runAsNonRoot: true` can be checked by the kubelet without reading /etc/passwd.
RUN groupadd --system --gid 65532 kubetune \
    && useradd --system --uid 65532 --gid kubetune --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kubetune

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY operator ./operator
COPY trainer-image/kubetune_trainer ./trainer-image/kubetune_trainer
# A regular (not editable) install; the sources are dropped afterwards. The trainer package is copied only
# because the distribution declares it; its dependencies (torch...) come with the [trainer] extra, not installed here.
RUN pip install --no-cache-dir -c constraints.txt ".[operator]" \
    && rm -rf /src

WORKDIR /
USER 65532:65532

# 8080: Prometheus metrics (KUBETUNE_METRICS_PORT); 8081: the liveness endpoint /healthz (KUBETUNE_HEALTH_PORT).
EXPOSE 8080 8081
ENTRYPOINT ["kubetune", "operator"]
