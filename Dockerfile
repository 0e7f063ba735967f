# The picker image: `picker serve` (the EPP) as a non-root user on a slim Python base.
#   docker build -t REGISTRY/picker:0.1.0 .
# It also carries the repository's vLLM simulator (`python -m loadtest.sim`, gateway/vllm-sim),
# which is why aiohttp is installed next to the picker.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/picker
WORKDIR /src
COPY pyproject.toml README.md ./
COPY picker ./picker
COPY loadtest ./loadtest
RUN /opt/picker/bin/pip install . "aiohttp>=3.10"

FROM python:3.11-slim
ENV PATH=/opt/picker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin picker
COPY --from=build /opt/picker /opt/picker
USER 10001
# ext_proc (gRPC, TLS), gRPC health, Prometheus metrics
EXPOSE 9002 9003 9090
ENTRYPOINT ["picker", "serve"]
