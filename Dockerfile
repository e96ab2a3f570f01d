# StructXLIP pipeline image: the `structxlip` CLI, the Prefect flows and a process worker.
# Build: docker build -t structxlip .      Run: docker run --rm structxlip --help
# The pinned torch wheel is the CUDA build: it uses a GPU when the container gets one and runs on CPU otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false

# libglib2.0-0: OpenCV's headless wheel still links it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first: this layer is reused until requirements.txt or constraints.txt change.
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

# The project itself. prefect.yaml's deployments run from /app (pull step), so the sources stay here.
COPY pyproject.toml README.md prefect.yaml ./
COPY configs ./configs
COPY storage ./storage
COPY pipelines ./pipelines
COPY structxlip ./structxlip
COPY flows ./flows
RUN pip install --no-deps .

# Non-root user; /data/images is mounted read-only, /data/out is where outputs go.
RUN useradd --create-home --uid 1000 structxlip \
    && mkdir -p /data/images /data/out \
    && chown structxlip:structxlip /data/out
USER structxlip
ENV HOME=/home/structxlip \
    PREFECT_HOME=/home/structxlip/.prefect \
    HF_HOME=/home/structxlip/.cache/huggingface

ENTRYPOINT ["structxlip"]
CMD ["--help"]
