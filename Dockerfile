# syntax=docker/dockerfile:1
# One image with the webhook, controller and router entry points (and the vLLM simulator, for test fleets).
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY common ./common
COPY webhook ./webhook
COPY controller ./controller
COPY router ./router
COPY vllmsim ./vllmsim
COPY localkube ./localkube
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="lora-autoscaler" \
      org.opencontainers.image.description="Places, loads, routes and autoscales LoRA adapters on vLLM replicas"
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONFAULTHANDLER=1
COPY --from=build /install /usr/local
RUN groupadd --system --gid 65532 lora && useradd --system --uid 65532 --gid lora --no-create-home lora
USER 65532:65532
# The manifests (config/) run each component as uid 65532 with a read-only root file system and pick the
# entry point with `command:` (lora-controller, lora-webhook, lora-router, vllm-sim). Ports: router 8000,
# metrics 8080 (controller, webhook) and 9090 (router), webhook TLS 9443.
EXPOSE 8000 8080 9090 9443
ENTRYPOINT ["lora-controller"]
