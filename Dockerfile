# One image for every role: `coap-bridge up | proxy | api`.
FROM python:3.11-slim
WORKDIR /app
# Every package pyproject.toml lists ([tool.setuptools.packages.find]); tests/test_dockerfile.py
# checks that each COPY source exists and is not excluded by .dockerignore.
COPY pyproject.toml README.md ./
COPY policies policies
COPY stores stores
COPY proxy proxy
COPY api api
COPY launcher launcher
COPY scripts/install-dtlssocket.sh scripts/install-dtlssocket.sh
COPY scripts/patches scripts/patches
# DTLSSocket (tinydtls) is built from source with our fix (scripts/install-dtlssocket.sh); its
# build tools are installed and purged in one layer.
RUN apt-get update \
    && apt-get install -y --no-install-recommends autoconf automake libtool gcc libc6-dev patch \
    && PIP_NO_CACHE_DIR=1 scripts/install-dtlssocket.sh python \
    && pip install --no-cache-dir . \
    && apt-get purge -y autoconf automake libtool gcc libc6-dev patch && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 bridge
USER bridge
# CoAP, CoAP over DTLS, the HTTP API, the embedded MQTT broker of `up`.
EXPOSE 5683/udp 5684/udp 8080 1883
# Liveness of the HTTP API (docs/API.md, "Health"), with Python's urllib: the slim image has no
# curl. Any answer but 2xx, or none within the timeout, exits non-zero. A role without an API
# sets COAP_BRIDGE_HEALTH_URL (the proxy: its metrics listener's /healthz) or its own
# healthcheck (compose.yaml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('COAP_BRIDGE_HEALTH_URL') or 'http://127.0.0.1:%s/healthz' % os.environ.get('COAP_BRIDGE_API_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["coap-bridge"]
# Reachable from outside the container: the API and the embedded broker on every address, and
# the demo device registered for the address datagrams from the Docker host arrive from (the
# bridge network's gateway). Pin the key with -e COAP_BRIDGE_API_KEY=... (README).
CMD ["up", "--api-host", "0.0.0.0", "--mqtt-host", "0.0.0.0", "--demo-ip", "gateway"]
