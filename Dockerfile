# One image for every role: `coap-bridge up | proxy | api`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY policies policies
COPY proxy proxy
COPY api api
COPY launcher launcher
RUN pip install --no-cache-dir . && useradd --system --uid 10001 bridge
USER bridge
ENTRYPOINT ["coap-bridge"]
CMD ["up", "--api-host", "0.0.0.0"]
