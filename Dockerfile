# The page's socket.io-client is vendored at build time (service/static/vendor is not in git), exactly
# as locked in package-lock.json, so a fresh clone builds a working image.
FROM node:20-slim AS vendor
WORKDIR /src
COPY package.json package-lock.json ./
COPY scripts/vendor_js.sh ./scripts/
RUN sh scripts/vendor_js.sh

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the image needs: copying the whole context would drag in .venv, var/ and .git.
# scripts/ is not part of the installed package; the seed job and the demo seeding run it from here.
COPY pyproject.toml README.md ./
COPY service ./service
COPY --from=vendor /src/service/static/vendor ./service/static/vendor
COPY scripts ./scripts
# redis: the scale profile's replicas share events through it (EXPORT_REDIS_URL).
RUN pip install '.[redis]'

# Exports and the embedded database (used when EXPORT_MONGO_URL is unset) must be writable by the
# unprivileged user; a named volume mounted on /data/exports takes this ownership when first created.
RUN useradd --system --uid 10001 --home-dir /app app \
    && mkdir -p /data/exports /app/var \
    && chown app /data/exports /app/var
USER app

ENV EXPORT_HOST=0.0.0.0 \
    EXPORT_PORT=8080 \
    EXPORT_DIR=/data/exports
EXPOSE 8080

# The slim image has no curl; the standard library can ask /healthz just as well.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('EXPORT_PORT', '8080'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]

CMD ["python", "-m", "service"]
