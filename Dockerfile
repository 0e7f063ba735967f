# Two images, neither with the load-test harness:
#   docker build -t REGISTRY/picker:0.1.0 .                               the picker (`picker serve`)
#   docker build --target vllm-sim -t REGISTRY/picker-vllm-sim:0.1.0 .   the vLLM simulator only
# (gateway/vllm-sim), installed with the `sim` extra's dependencies and none of the picker's.

FROM python:3.11-slim AS sim-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/vllm-sim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vllm_sim ./vllm_sim
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['sim'], sep='\n')" > sim.txt \
    && /opt/vllm-sim/bin/pip install -r sim.txt \
    && /opt/vllm-sim/bin/pip install --no-deps .

FROM python:3.11-slim AS vllm-sim
ENV PATH=/opt/vllm-sim/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sim
COPY --from=sim-build /opt/vllm-sim /opt/vllm-sim
USER 10001
EXPOSE 8000
ENTRYPOINT ["python", "-m", "vllm_sim"]

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/picker
WORKDIR /src
COPY pyproject.toml README.md ./
COPY picker ./picker
RUN /opt/picker/bin/pip install .

FROM python:3.11-slim AS picker
ENV PATH=/opt/picker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin picker
COPY --from=build /opt/picker /opt/picker
USER 10001
# ext_proc (gRPC, TLS), gRPC health, Prometheus metrics
EXPOSE 9002 9003 9090
ENTRYPOINT ["picker", "serve"]
