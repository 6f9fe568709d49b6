# One image for every role: `coap-bridge up | proxy | api`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY policies policies
COPY links links
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
ENTRYPOINT ["coap-bridge"]
CMD ["up", "--api-host", "0.0.0.0"]
