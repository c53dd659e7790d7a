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

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
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
# Install from the builder's wheels only (--no-index: nothing is downloaded here), then remove the
# installers themselves: the running image never installs anything.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels mcp-auth-gateway \
    && pip uninstall --yes pip setuptools wheel
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["mcp-gateway"]
CMD ["serve", "--config", "/etc/mcp-gateway/config.yaml"]
