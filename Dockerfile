# syntax=docker/dockerfile:1
# Build stage: wheels for receiver and its dependencies (build tools stay here).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY receiver ./receiver
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: slim, non-root, no compilers.
FROM python:3.11-slim
RUN groupadd --gid 10001 receiver \
    && useradd --create-home --uid 10001 --gid 10001 receiver
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/* && rm -rf /wheels
# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd (hadolint DL3066).
USER 10001:10001
WORKDIR /home/receiver
ENV PYTHONUNBUFFERED=1 \
    RECEIVER_LOG_FORMAT=json
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["receiver", "serve", "--host", "0.0.0.0", "--port", "8000"]
