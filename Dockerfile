# syntax=docker/dockerfile:1
# Multi-stage build of every TokenFlow binary. One builder stage compiles the workspace — the
# agent's eBPF object included (nightly + rust-src + bpf-linker against LLVM 22, the recipe of
# docs/DESIGN) — and one small runtime stage per binary copies what it needs:
#
#   docker build --target agent       -t tokenflow/agent .
#   docker build --target hint-server -t tokenflow/hint-server .
#   docker build --target backend     -t tokenflow/backend .
#   docker build --target pacer       -t tokenflow/pacer .
#
# GPU nodes: build the backend with `--build-arg BACKEND_FEATURES=cuda` on a CUDA base (see README).

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS builder
ARG BACKEND_FEATURES=""
# LLVM 22 for bpf-linker (apt.llvm.org), protoc for the gRPC test server's build script.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates curl gnupg protobuf-compiler \
 && curl -fsSL https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/llvm.gpg \
 && echo "deb [signed-by=/usr/share/keyrings/llvm.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-22 main" \
      > /etc/apt/sources.list.d/llvm.list \
 && apt-get update -q \
 && apt-get install -y -q --no-install-recommends llvm-22-dev libpolly-22-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install nightly --profile minimal --component rust-src \
 && LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22
WORKDIR /src
COPY . .
# The dashboard's charting library (Apache ECharts) from the npm registry, pinned and checked, as
# `cargo xtask setup` vendors it.
ARG ECHARTS_VERSION=6.1.0
ARG ECHARTS_SHA256=681aff88cc1038c3fa941a3a53d1b177a52250b05335efc607d6105ae13be481
RUN curl -fsSL -o /tmp/echarts.tgz https://registry.npmjs.org/echarts/-/echarts-${ECHARTS_VERSION}.tgz \
 && echo "${ECHARTS_SHA256}  /tmp/echarts.tgz" | sha256sum -c - \
 && tar -xzf /tmp/echarts.tgz -C /tmp package/dist/echarts.min.js \
 && mkdir -p hint-server/ui/vendor \
 && cp /tmp/package/dist/echarts.min.js hint-server/ui/vendor/ \
 && echo "${ECHARTS_VERSION}" > hint-server/ui/vendor/VERSION
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
      -p tokenflow-agent -p tokenflow-hint-server -p tokenflow-pacer \
 && cargo build --release --locked -p tokenflow-backend --features "${BACKEND_FEATURES}" \
 && mkdir -p /out \
 && cp target/release/tokenflow-agent target/release/tokenflow-hint-server \
       target/release/tokenflow-backend target/release/tokenflow-pacer /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

# The agent loads eBPF programs: run it privileged (or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN,
# CAP_SYS_RESOURCE), host PID and network, with /sys/fs/bpf, /sys/kernel/tracing and /sys/kernel/btf.
# NVML is found at run time (libnvidia-ml.so.1 from the NVIDIA container toolkit); without it every
# window reports "gpu": {"available": false, …}.
FROM runtime AS agent
COPY --from=builder /out/tokenflow-agent /usr/local/bin/
ENV TOKENFLOW_METRICS_ADDR=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD curl -fsS http://127.0.0.1:9464/metrics >/dev/null || exit 1
ENTRYPOINT ["tokenflow-agent"]

FROM runtime AS hint-server
COPY --from=builder /out/tokenflow-hint-server /usr/local/bin/
COPY hint-server/fixtures/trace.jsonl /usr/share/tokenflow/trace.jsonl
ENV TOKENFLOW_HINT_LISTEN=0.0.0.0:8700 TOKENFLOW_HINT_METRICS=0.0.0.0:9465
EXPOSE 8700 9465
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD curl -fsS http://127.0.0.1:8700/readyz >/dev/null || exit 1
ENTRYPOINT ["tokenflow-hint-server"]
CMD ["serve"]

FROM runtime AS backend
COPY --from=builder /out/tokenflow-backend /usr/local/bin/
COPY deploy/backend-entrypoint.sh /usr/local/bin/
ENV TOKENFLOW_BACKEND_LISTEN=0.0.0.0:8000 TOKENFLOW_BACKEND_MODEL=/models/tokenflow
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD curl -fsS http://127.0.0.1:8000/health >/dev/null || exit 1
ENTRYPOINT ["backend-entrypoint.sh"]

FROM runtime AS pacer
COPY --from=builder /out/tokenflow-pacer /usr/local/bin/
ENTRYPOINT ["tokenflow-pacer"]
