# syntax=docker/dockerfile:1
# Build stage: a virtual environment with the pinned dependencies (requirements.lock, hashes
# checked) and receiver itself; compilers and pip caches stay in this stage.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/receiver
COPY requirements.lock /src/
RUN /opt/receiver/bin/pip install --require-hashes -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY receiver /src/receiver
RUN /opt/receiver/bin/pip install --no-deps /src

# Runtime stage: slim, non-root; only the finished virtual environment is copied in, so no
# wheel or build layer is left behind.
FROM python:3.11-slim
RUN groupadd --gid 10001 receiver \
    && useradd --create-home --uid 10001 --gid 10001 receiver \
    && mkdir -p /var/lib/receiver \
    && chown 10001:10001 /var/lib/receiver
COPY --from=build /opt/receiver /opt/receiver
# State: the SQLite ledger and queue, the local archive (unless RECEIVER_ARCHIVE_URL=s3://...)
# and the polling file live under /var/lib/receiver. Mount a volume there to keep them.
ENV PATH=/opt/receiver/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RECEIVER_LOG_FORMAT=json \
    RECEIVER_LEDGER_URL=sqlite:////var/lib/receiver/receiver.db \
    RECEIVER_ARCHIVE_URL=file:///var/lib/receiver/archive \
    RECEIVER_LOCAL_DB=/var/lib/receiver/local.db
VOLUME ["/var/lib/receiver"]
# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd (hadolint DL3066).
USER 10001:10001
WORKDIR /var/lib/receiver
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
