# Multi-stage build: wheels are built in the first stage, the runtime image holds only the
# installed package, runs as a non-root numeric user (Kubernetes runAsNonRoot can verify
# it), and checks readiness over HTTP. Every pip install is pinned by constraints.txt
# (scripts/lock writes it from the tested environment).
FROM python:3.11-slim AS build
WORKDIR /src
COPY constraints.txt pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --constraint constraints.txt pip \
 && pip wheel --no-cache-dir --constraint constraints.txt --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/var/cache/gateway/numba \
    GATEWAY_HTTP__HOST=0.0.0.0 \
    GATEWAY_GRPC__HOST=0.0.0.0
COPY --from=build /wheels /wheels
COPY constraints.txt /tmp/constraints.txt
RUN pip install --no-cache-dir --no-index --find-links /wheels \
      --constraint /tmp/constraints.txt onnx-v2-gateway \
 && rm -rf /wheels /tmp/constraints.txt \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/gateway --create-home gateway \
 && mkdir -p /var/cache/gateway/numba && chown -R 10001:10001 /var/cache/gateway
USER 10001:10001
WORKDIR /var/lib/gateway
# 8000: V2 REST, 8001: V2 gRPC (+ grpc.health.v1), 8002: admin API (loopback by default).
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
