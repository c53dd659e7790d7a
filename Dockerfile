# syntax=docker/dockerfile:1
#
# The MCP authorization gateway image.
#
#   docker build -t mcp-gateway .
#   docker run -p 8080:8080 -v "$PWD/config.yaml:/etc/mcp-gateway/config.yaml:ro" mcp-gateway
#
# The builder stage turns the project and its dependencies into wheels; the runtime stage installs
# only those wheels, so it carries no compiler, no source tree and no build cache. It runs as the
# fixed unprivileged user 10001, which the Helm chart's securityContext expects, and works with a
# read-only root filesystem (only /tmp needs to be writable). There is no HEALTHCHECK: Kubernetes
# probes /healthz and /readyz instead (see helm/mcp-gateway).
#
# Reproducible inputs. The base image is pinned by the digest of the python:3.11-slim multi-platform
# index, so a rebuild starts from the same bytes until someone moves the pin on purpose (to pick up
# Debian and CPython security fixes: `docker buildx imagetools inspect python:3.11-slim` prints the
# current index digest; update both FROM lines). Every Python package comes from a hashed lock
# generated with pip-tools from pyproject.toml (regenerate both files after changing dependencies).
# The runtime lock includes the `otel` extra, so `telemetry.otlp_endpoint` and `audit.sink: otlp` work:
#   pip-compile --generate-hashes --strip-extras --no-emit-find-links --no-emit-index-url --extra otel \
#     --output-file=requirements.lock pyproject.toml
#   pip-compile --generate-hashes --strip-extras --no-emit-find-links --no-emit-index-url --allow-unsafe \
#     --only-build-deps --all-build-deps --output-file=build-requirements.lock pyproject.toml
# pip refuses any file whose hash is not in the lock (--require-hashes), and the project itself is
# built without fetching anything unhashed (--no-build-isolation, build tools from their own lock).

FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.lock build-requirements.lock ./
RUN pip install --require-hashes --no-deps -r build-requirements.lock \
    && pip wheel --require-hashes --no-deps --only-binary=:all: --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /wheels .

FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS runtime
LABEL org.opencontainers.image.title="mcp-gateway" \
      org.opencontainers.image.description="Enterprise-managed authorization (ID-JAG) gateway for unmodified MCP servers" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 mcp-gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mcp-gateway \
    && mkdir -p /etc/mcp-gateway
# Install from the builder's wheels only (--no-index: nothing is downloaded here; the lock's hashes
# are checked once more), then remove the installers themselves: the running image never installs
# anything.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,from=builder,source=/src/requirements.lock,target=/tmp/requirements.lock \
    pip install --no-index --find-links /wheels --require-hashes -r /tmp/requirements.lock \
    && pip install --no-index --find-links /wheels --no-deps mcp-auth-gateway \
    && pip uninstall --yes pip setuptools wheel
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["mcp-gateway"]
CMD ["serve", "--config", "/etc/mcp-gateway/config.yaml"]
