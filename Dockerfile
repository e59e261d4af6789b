# One image for both roles: `netfence controller` and `netfence agent`.
#   docker build -t netfence:dev .
# Build stage: install netfence and its dependencies into a virtualenv. Everything it needs
# ships as wheels, so no compiler is involved, and none of pip's caches reach the final stage.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/netfence
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY agent ./agent
RUN /opt/netfence/bin/pip install --no-compile . \
 && /opt/netfence/bin/python -m compileall -q /opt/netfence/lib

# Final stage: the runtime only. From Debian: nftables + libnftables1 (the agent drives
# libnftables through pip-nftables), iproute2 (ip netns, for debugging on a node). No kmod:
# br_netfilter is loaded on the node, not from the pod (manifests/agent.yaml says why).
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables libnftables1 iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/netfence /opt/netfence
ENV PATH=/opt/netfence/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="netfence" \
      org.opencontainers.image.description="Kubernetes NetworkPolicy enforcement with nftables for flannel clusters"
ENTRYPOINT ["netfence"]
CMD ["--help"]
