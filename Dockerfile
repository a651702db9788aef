# Multi-stage build: wheels are built in the first stage, the runtime image holds only the
# installed package, runs as a non-root user, and checks readiness over HTTP.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/var/cache/gateway/numba \
    GATEWAY_HTTP__HOST=0.0.0.0 \
    GATEWAY_GRPC__HOST=0.0.0.0
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
 && mkdir -p /var/cache/gateway/numba && chown -R gateway /var/cache/gateway
USER gateway
WORKDIR /var/lib/gateway
# 8000: V2 REST, 8001: V2 gRPC (+ grpc.health.v1), 8002: admin API (loopback by default).
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status == 200 else 1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve"]
