# NexLM: one container, offline-capable (the embedded demo model is baked in).
# Build stage: compile llama-cpp-python once, portable to any x86-64 (no -march=native).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.txt .
RUN pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 NEXLM_CACHE=/var/lib/nexlm
RUN useradd --system --create-home --home-dir /home/nexlm nexlm \
    && mkdir -p /var/lib/nexlm && chown nexlm /var/lib/nexlm
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY app.py ./
COPY nexlm ./nexlm
COPY templates ./templates
COPY static ./static
USER nexlm
# Write the packaged GGUF once at build time, so the first chat needs no disk work.
RUN python -c "from nexlm.providers.gguf import prepare_default_model; prepare_default_model()"
EXPOSE 8080
# Mount a config at /etc/nexlm.toml and set NEXLM_CONFIG=/etc/nexlm.toml, or use env vars.
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "8080"]
