# syntax=docker/dockerfile:1
#
# Three images from one file (BuildKit, the default builder of Docker 23+ and of Compose):
#
#   docker build --target sidecar -t a1111-sidecar:0.1.0 .          # slim: the worker (CPU)
#   docker build --target standin -t a1111-sidecar:0.1.0-standin .  # the same + the A1111 stand-in
#   docker build --target gpu     -t a1111-sidecar:0.1.0-gpu .      # A1111 + the worker in one GPU container
#
# Base images are pinned by tag. To pin by digest as well (reproducible builds, no silent re-tags),
# resolve the digest once and pass it, e.g.
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm     # prints "Digest: sha256:..."
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> ...
# (same for A1111_BASE_IMAGE).

# The worker's Python (the project needs >= 3.11). Debian bookworm.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# Base of the gpu image. A plain Python 3.11 image on purpose: the torch wheels that A1111 installs
# (torch 2.1.2+cu121 for v1.10.1) bundle the CUDA and cuDNN libraries, and the NVIDIA container
# toolkit mounts the driver at run time, so a CUDA base image would only add a second copy of CUDA.
# A1111 v1.10.1 supports Python 3.7-3.11 on Linux, so it and the worker share the interpreter (each
# in its own virtual environment). Any Debian/Ubuntu image whose `python3` is 3.11 works here.
ARG A1111_BASE_IMAGE=python:3.11.14-slim-bookworm


######## build: the runtime part of the lock file, and the project's wheel ########
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# requirements.lock also pins the dev tools; keep only what [project].dependencies + [azure-ad] need
# (the worker), and for the stand-in image also the [tools] extra (fastapi, uvicorn, Pillow, ...).
COPY requirements.lock pyproject.toml deploy/docker/runtime-requirements.py ./
RUN python runtime-requirements.py --extra azure-ad > runtime.lock \
 && python runtime-requirements.py --extra azure-ad --extra tools > standin.lock
COPY README.md ./
COPY sidecar/ sidecar/
COPY a1111/ a1111/
RUN pip wheel --no-deps --wheel-dir /dist .


######## sidecar: the worker, no GPU (the compose "cpu" profile; without the stand-in's libraries) ########
FROM ${PYTHON_IMAGE} AS sidecar
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/sidecar/bin:$PATH \
    SIDECAR_LOG_FORMAT=json
RUN groupadd --system --gid 10001 sidecar \
 && useradd --system --uid 10001 --gid sidecar --create-home --home-dir /home/sidecar --shell /usr/sbin/nologin sidecar \
 && install -d -o sidecar -g sidecar -m 0700 /var/lib/sidecar
# Dependencies first (hash-checked, wheels only): this layer changes only with requirements.lock.
RUN --mount=type=bind,from=build,source=/src/runtime.lock,target=/tmp/runtime.lock \
    python -m venv /opt/sidecar \
 && /opt/sidecar/bin/pip install --require-hashes --only-binary=:all: -r /tmp/runtime.lock
RUN --mount=type=bind,from=build,source=/dist,target=/tmp/dist \
    /opt/sidecar/bin/pip install --no-deps /tmp/dist/*.whl
WORKDIR /app
COPY examples/ examples/
USER 10001:10001
# 8000: /healthz, /readyz, /metrics of the worker.
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SIDECAR_HTTP_PORT', '8000'), timeout=4)"]
# No ENTRYPOINT, so one image serves several roles: the worker (default) and one-shot commands
# (python -m sidecar enqueue ...).
CMD ["python", "-m", "sidecar", "run"]


######## standin: the sidecar image plus the [tools] extra, to run the A1111 stand-in (no GPU) ########
FROM sidecar AS standin
USER 0:0
RUN --mount=type=bind,from=build,source=/src/standin.lock,target=/tmp/standin.lock \
    /opt/sidecar/bin/pip install --require-hashes --only-binary=:all: -r /tmp/standin.lock
USER 10001:10001
# 7860: the stand-in's A1111 API.
EXPOSE 7860
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/sdapi/v1/sd-models', timeout=4)"]
CMD ["python", "-m", "a1111.standin", "--host", "0.0.0.0", "--port", "7860"]


######## gpu: AUTOMATIC1111 stable-diffusion-webui + the worker, one GPU container ########
FROM ${A1111_BASE_IMAGE} AS gpu
# A1111 release (git tag) and where to get it.
ARG A1111_VERSION=v1.10.1
ARG A1111_REPO=https://github.com/AUTOMATIC1111/stable-diffusion-webui.git
# Stability-AI/stablediffusion, which A1111 v1.10.1 clones at build, is no longer public (since about
# December 2025); A1111's dev branch switched to this fork, which has the same pinned commit.
ARG STABLE_DIFFUSION_REPO=https://github.com/w-e-w/stablediffusion.git
# OpenAI's CLIP (2021) imports pkg_resources in setup.py, which current setuptools no longer has:
# build it without isolation, against the setuptools pinned below.
ARG CLIP_PACKAGE="https://github.com/openai/CLIP/archive/d50d76daa670286dd6cacf3bcd80b5e4823fc8e1.zip --no-build-isolation"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    GIT_TERMINAL_PROMPT=0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    A1111_DIR=/opt/a1111/webui \
    A1111_PYTHON=/opt/a1111/venv/bin/python \
    HF_HOME=/opt/a1111/hf-cache \
    PATH=/opt/sidecar/bin:$PATH \
    SIDECAR_LOG_FORMAT=json \
    SIDECAR_A1111_URL=http://127.0.0.1:7860 \
    SIDECAR_A1111_COMMAND=/opt/a1111/start-webui.sh

# git: A1111 clones its helper repositories and reads its version from git; libgl1 + libglib2.0-0:
# OpenCV (pulled in by A1111's requirements); tini: PID 1 that forwards SIGTERM and reaps A1111's
# children. Distribution packages follow the pinned base image, so they are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git libgl1 libglib2.0-0 tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sidecar \
 && useradd --uid 10001 --gid sidecar --create-home --home-dir /home/sidecar --shell /usr/sbin/nologin sidecar \
 && install -d -o sidecar -g sidecar -m 0700 /var/lib/sidecar \
 && install -d -o sidecar -g sidecar /opt/a1111 /opt/sidecar \
    /models /models/Stable-diffusion /models/Lora /models/VAE /models/embeddings

# Everything below runs as the unprivileged user, so no layer has to be chown'ed (and copied) again.
USER 10001:10001
RUN git clone --depth 1 --branch "${A1111_VERSION}" "${A1111_REPO}" "${A1111_DIR}" \
 && python3 -m venv /opt/a1111/venv \
 && /opt/a1111/venv/bin/pip install setuptools==69.5.1 wheel==0.43.0
COPY --chown=10001:10001 --chmod=0755 a1111/start-webui.sh /opt/a1111/start-webui.sh
COPY --chown=10001:10001 a1111/webui-flags.txt /opt/a1111/webui-flags.txt
# A1111's own installer, run once here with the same flags as at run time plus --exit: torch,
# requirements_versions.txt, the pinned helper repositories. No GPU is needed for this
# (--skip-torch-cuda-test); at run time start-webui.sh adds --skip-prepare-environment, so the
# container never runs pip or git. Then the CLIP tokenizer and text-encoder config that SD 1.x and
# SDXL checkpoints fetch from the Hugging Face hub on their first load are cached (HF_HOME), so
# loading a model needs no network either.
RUN STABLE_DIFFUSION_REPO="${STABLE_DIFFUSION_REPO}" CLIP_PACKAGE="${CLIP_PACKAGE}" \
    /opt/a1111/start-webui.sh --prepare \
 && "${A1111_PYTHON}" -c "from transformers import CLIPTextConfig, CLIPTokenizer; \
CLIPTokenizer.from_pretrained('openai/clip-vit-large-patch14'); \
CLIPTextConfig.from_pretrained('openai/clip-vit-large-patch14')"
# From here on (and at run time) Hugging Face libraries use only that cache and never go online.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# The worker last, so that changing it does not rebuild A1111.
RUN --mount=type=bind,from=build,source=/src/runtime.lock,target=/tmp/runtime.lock \
    python3 -m venv /opt/sidecar \
 && /opt/sidecar/bin/pip install --require-hashes --only-binary=:all: -r /tmp/runtime.lock
RUN --mount=type=bind,from=build,source=/dist,target=/tmp/dist \
    /opt/sidecar/bin/pip install --no-deps /tmp/dist/*.whl

WORKDIR /home/sidecar
# Models: mount them at /models (read-only is fine; keep the four subfolders created above) or bake
# them into a derived image (deploy/docker/Dockerfile.models); see deploy/README.md. No VOLUME here,
# so that a derived image can COPY into /models and Compose does not create anonymous volumes.
# Only the worker's port: A1111 listens on 127.0.0.1:7860 inside the container.
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SIDECAR_HTTP_PORT', '8000'), timeout=4)"]
# The worker starts A1111 (SIDECAR_A1111_COMMAND) as a supervised child, waits for its warm-up, and
# stops it after draining on SIGTERM.
ENTRYPOINT ["tini", "--", "a1111-sidecar"]
CMD ["run"]
