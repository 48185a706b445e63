# Quant-AI runtime image: Python 3.11 + JDK 17 (RayDP/Spark), pinned dependencies, non-root.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64

RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 quant
WORKDIR /app

COPY pyproject.toml constraints.txt README.md ./
# The CPU build of torch 2.13.0 first, so nothing resolves the CUDA wheels: pass the CPU wheel
# index of your mirror as TORCH_CPU_INDEX (docker build --build-arg TORCH_CPU_INDEX=...).
ARG TORCH_CPU_INDEX
RUN test -n "$TORCH_CPU_INDEX" || (echo "set --build-arg TORCH_CPU_INDEX" && exit 1); \
    pip install torch==2.13.0 --index-url "$TORCH_CPU_INDEX" \
    && pip install -c constraints.txt "ray[data,train,tune,serve]==2.60.0" raydp==1.6.5 pyspark==3.5.7

COPY --chown=quant:quant . .
RUN pip install -c constraints.txt --no-deps -e . \
    && pip check
ENV PYSPARK_PYTHON=/usr/local/bin/python

USER quant
EXPOSE 8000 8265
# Healthy while the Ray runtime the job started answers (the Serve app adds /healthz later).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ray status >/dev/null 2>&1 || exit 1

# Default: the data pipeline on a local Ray; the Serve application replaces this once it lands.
CMD ["python", "-m", "jobs.pipeline", "--config", "configs/pipeline/local.yaml"]
