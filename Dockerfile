# Quant-AI runtime image: Python 3.11 + JDK 17 (RayDP/Spark), pinned dependencies, non-root user.
# The default command serves the signal API (Ray Serve, port 8000) on a Ray local to the
# container; the same image runs every node of ray-cluster.yaml and every pod of deploy/k8s/.
#
#   docker build -t quant-ai:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       -t quant-ai:0.1.0-gpu .                      # GPU workers: CUDA build, same torch pin
#   docker run --shm-size=2g -e QUANT_AI_JWT_SECRET=... \
#       -v "$PWD/.secrets:/app/.secrets:ro" -v "$PWD/registry:/app/registry" quant-ai:0.1.0
#
# Checked against pyproject.toml / constraints.txt (and by hadolint) in tests/unit/test_dockerfile.py.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk \
    PYSPARK_PYTHON=/usr/local/bin/python

# JDK 17 for RayDP/Spark (the package name pins the major version; patch releases are taken as
# Debian ships them, for their security fixes). rsync and ssh: the Ray cluster launcher syncs
# files into the container with `rsync -e 'docker exec'`, and the head's autoscaler reaches the
# worker hosts over ssh.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless openssh-client rsync \
    && ln -s "/usr/lib/jvm/java-17-openjdk-$(dpkg --print-architecture)" "$JAVA_HOME" \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 quant \
    && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash quant
WORKDIR /app

# Dependencies first (their layer is rebuilt only when the pins change): torch 2.13.0 from the
# CPU wheel index (no CUDA packages; pass a CUDA index for the GPU image), then the project's
# direct dependencies from pyproject.toml under the lock in constraints.txt.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml constraints.txt ./
RUN pip install --no-deps --index-url "$TORCH_INDEX_URL" torch==2.13.0 \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code (named directories only: no virtualenv, lake, registry or secrets from the build
# context), installed in place so that the relative config paths resolve from /app.
COPY README.md ./
COPY market/ market/
COPY cluster/ cluster/
COPY jobs/ jobs/
COPY models/ models/
COPY serve/ serve/
COPY configs/ configs/
RUN pip install -c constraints.txt --no-deps -e . \
    && pip check \
    && mkdir -p var registry lake .secrets \
    && chown quant:quant var registry lake .secrets

USER 1000:1000
# 8000: the signal API; 8265: the Ray dashboard. The operator port (metrics, detailed readiness;
# serve.operator, 9470-9477) binds 127.0.0.1: set its bind_address to 0.0.0.0 and publish the
# range to scrape it from outside the container.
EXPOSE 8000 8265

# Liveness of the Serve application (GET /healthz; no curl in slim images, so Python's urllib).
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"]

# The signal API on a Ray started inside the container; it serves until the container stops.
CMD ["python", "-m", "jobs.deploy", "--config", "configs/serve/local.yaml", "--host", "0.0.0.0"]
