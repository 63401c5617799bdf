# NexLM: one container, offline-capable (the embedded demo model is baked in).
# Both stages use the same base; replace it with --build-arg BASE_IMAGE=... (any Debian-based
# image with Python 3.11+ as `python` and apt), e.g. a locally assembled one where no registry
# is reachable (tests/container/build_base.sh).
ARG BASE_IMAGE=python:3.11-slim

# Build stage: compile llama-cpp-python once, portable to any x86-64 (GGML_NATIVE=OFF from
# requirements.txt, no -march=native), into a virtual environment the runtime stage copies.
FROM ${BASE_IMAGE} AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.txt .
# --upgrade-deps: requirements.txt needs pip >= 23.1 (--config-settings on a requirement line).
RUN python -m venv --upgrade-deps /opt/nexlm \
    && /opt/nexlm/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

FROM ${BASE_IMAGE}
# Conversations live in SQLite on the data volume (-v nexlm-data:/var/lib/nexlm keeps them across
# containers); -e NEXLM_STORE=memory or a redis:// URL chooses another store.
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 NEXLM_CACHE=/var/lib/nexlm PATH=/opt/nexlm/bin:$PATH \
    NEXLM_STORE=sqlite:/var/lib/nexlm/nexlm.db
# libgomp1: llama.cpp's threads are OpenMP, and the compiler's runtime library (libgomp.so.1)
# is not in slim images; without it the model cannot load.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /home/nexlm nexlm \
    && mkdir -p /var/lib/nexlm && chown nexlm /var/lib/nexlm
COPY --from=build /opt/nexlm /opt/nexlm
WORKDIR /app
COPY app.py ./
COPY nexlm ./nexlm
COPY templates ./templates
COPY static ./static
USER nexlm
# Prepare the packaged GGUF once at build time, so the first chat needs no disk work.
RUN python -c "from nexlm.providers.gguf import prepare_default_model; print(prepare_default_model())"
# After the model is prepared there: a new named volume starts with the image's copy of it.
VOLUME /var/lib/nexlm
EXPOSE 8080
# Mount a config at /etc/nexlm.toml and set NEXLM_CONFIG=/etc/nexlm.toml, or use env vars.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "8080"]
