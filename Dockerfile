# sdbatch container image. Default: CUDA runtime with the matching CUDA build of PyTorch.
#   docker build -t sdbatch:cuda .
#   docker build -t sdbatch:cpu --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# The same image serves `sdbatch submit` and the Ray head and worker pods (infra/kuberay/).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

# TORCH_INDEX holds the torch wheels built for the base image's CUDA (cu128 for CUDA 12.8)
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/sdbatch \
    PATH=/opt/sdbatch/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's own python3 is the interpreter; apt package versions follow the base image's
# release, so pinning them here would only break rebuilds when the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, the version constraints.txt pins, from the index matching the base image;
# then sdbatch and its dependencies (the same constraint keeps that torch build)
WORKDIR /src
COPY constraints.txt ./
RUN pip install --index-url "$TORCH_INDEX" -c constraints.txt torch
COPY pyproject.toml README.md ./
COPY sdbatch ./sdbatch
RUN pip install -c constraints.txt . && rm -rf /src

# sdbatch runs as an unprivileged user (uid 10001: ubuntu images already use 1000);
# models from s3:// are cached in its home
RUN useradd --create-home --uid 10001 --user-group --shell /bin/bash sdbatch
USER 10001:10001
WORKDIR /home/sdbatch
ENV SDBATCH_MODEL_CACHE=/home/sdbatch/.cache/sdbatch/models

ENTRYPOINT ["sdbatch"]
CMD ["--help"]
