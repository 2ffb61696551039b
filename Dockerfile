# llmbench on a CPU-only image. Sets up with the same script a user runs (tools/env_setup.sh).
#   docker build -t llmbench .                                  the default setup
#   docker build --build-arg LLMBENCH_SETUP=ipex -t llmbench:ipex .   plus IPEX 2.8 for --ipex
# Not built here (no Docker engine on the development machines): see README, "Not tried here".
FROM python:3.11-slim-bookworm
ARG LLMBENCH_SETUP=default

RUN apt-get update \
    && apt-get install -y --no-install-recommends git g++ numactl libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llmbench
COPY . .
# torch==2.13.0 from PyPI: the CPU wheel index is added so pip never pulls the CUDA build.
# LLMBENCH_NO_TEST_TOOLS: no AArch64 cross compiler / qemu-user (only the NEON kernel test uses
# them) in the image.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1 \
    LLMBENCH_NO_TEST_TOOLS=1
# A venv, so that --with-ipex (which replaces torch and transformers) has one to install into.
RUN python -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN case "$LLMBENCH_SETUP" in \
      default) bash tools/env_setup.sh ;; \
      ipex) bash tools/env_setup.sh --with-ipex ;; \
      *) echo "LLMBENCH_SETUP must be default or ipex, not $LLMBENCH_SETUP" >&2; exit 2 ;; \
    esac
# Convert the embedded model's GGUF once at build time, so the first run starts in seconds.
RUN python -c "from llmbench.models import materialize_gguf, resolve_source; \
materialize_gguf(resolve_source(None))"

CMD ["bash", "-c", "source tools/env_activate.sh && python run.py --benchmark --token-latency"]
