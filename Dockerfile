# StructXLIP pipeline image: the `structxlip` CLI, the Prefect flows and a process worker.
# Build: docker build -t structxlip .
# Run:   docker run --rm structxlip --help
#        docker run --rm -v "$PWD/outputs:/data/out" -e STRUCTXLIP_UID=$(id -u) -e STRUCTXLIP_GID=$(id -g) \
#            structxlip demo --out /data/out/demo
# The pinned torch wheel is the CUDA build: it uses a GPU when the container gets one and runs on CPU otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false

# libglib2.0-0: OpenCV's headless wheel still links it. setpriv (util-linux, in the base image) drops root in the
# entrypoint.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first: this layer is reused until requirements.txt or constraints.txt change.
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt

# The project itself, installed editable: the one copy of the code is /app (prefect.yaml's pull step runs the flows
# from here, and `structxlip demo` finds /app/sample next to flows/).
COPY pyproject.toml README.md prefect.yaml ./
COPY configs ./configs
COPY storage ./storage
COPY pipelines ./pipelines
COPY structxlip ./structxlip
COPY flows ./flows
COPY sample ./sample
RUN pip install --no-deps -e .

# Runtime user uid 1000 with every folder it writes created (and owned) in the image, so named volumes mounted there
# start with that owner. /data/images is mounted read-only, /data/out is where outputs go; caches live under
# ~/.cache (Hugging Face hub + the tiny CLIP), Prefect's under ~/.prefect.
RUN useradd --create-home --uid 1000 structxlip \
    && mkdir -p /data/images /data/out /app/demo-out \
        /home/structxlip/.cache/huggingface /home/structxlip/.cache/structxlip /home/structxlip/.prefect \
    && chown -R structxlip:structxlip /data/out /app/demo-out /home/structxlip
ENV HOME=/home/structxlip \
    XDG_CACHE_HOME=/home/structxlip/.cache \
    PREFECT_HOME=/home/structxlip/.prefect \
    HF_HOME=/home/structxlip/.cache/huggingface \
    STRUCTXLIP_CACHE=/home/structxlip/.cache/structxlip

# The entrypoint starts as root only to give bind mounts and volumes to the runtime user (STRUCTXLIP_UID, default
# 1000), then runs the command as that user; nothing runs as root after it.
COPY docker/entrypoint.sh /usr/local/bin/structxlip-entrypoint
RUN chmod 0755 /usr/local/bin/structxlip-entrypoint
ENV STRUCTXLIP_UID=1000 \
    STRUCTXLIP_GID=1000
ENTRYPOINT ["structxlip-entrypoint"]
CMD ["structxlip", "--help"]
