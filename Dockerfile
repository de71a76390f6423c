# GPU image: CUDA runtime base; the torch wheel brings its own CUDA libraries, the base supplies the driver glue.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 pdae
WORKDIR /home/pdae/app
RUN python3 -m venv /opt/venv && chown -R pdae /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# A matching torch/torchvision pair, pinned.
RUN pip install "torch==2.14.1" "torchvision==0.29.1"
COPY --chown=pdae pyproject.toml README.md ./
COPY --chown=pdae pdae ./pdae
RUN pip install ".[gdrive,lmdb]"
COPY --chown=pdae . .

USER pdae
ENTRYPOINT ["pdae"]
CMD ["--help"]
