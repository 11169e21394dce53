# syntax=docker/dockerfile:1
# Images of both services from one file; pick one with --target:
#   docker build --target order-svc  -t orders/order-svc:dev .
#   docker build --target notify-svc -t orders/notify-svc:dev .
# (compose.yaml does this for you.) Both targets share the build stage and the
# runtime base, so building the second one costs nothing.

ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=debian:12.12-slim

# ---- build: both release binaries -------------------------------------------
FROM ${RUST_IMAGE} AS build
# librdkafka is compiled from source by rdkafka-sys (configure + make, perl and
# python3 in its scripts); the `ssl` feature links the system OpenSSL.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      gcc g++ make perl python3 pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Dependency caching with BuildKit cache mounts: the cargo registry and the
# target directory survive between builds, so a source change rebuilds only
# the workspace crates, not librdkafka and the ~300 dependencies. The target
# dir is a cache mount (not in the image), hence the copy to /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin order-svc --bin notify-svc \
 && mkdir -p /out \
 && cp target/release/order-svc target/release/notify-svc /out/

# ---- runtime: slim Debian with what the binaries link dynamically -----------
FROM ${RUNTIME_IMAGE} AS runtime
# libssl3 (librdkafka's TLS), zlib1g (compression), ca-certificates (TLS to
# brokers and webhooks); glibc and libgcc come with the base image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 zlib1g ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin app
COPY --from=build /out/order-svc /out/notify-svc /usr/local/bin/
USER 10001:10001

# ---- per-service targets ----------------------------------------------------
FROM runtime AS notify-svc
EXPOSE 9091
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/notify-svc", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/notify-svc"]

# Last stage: the default target of a plain `docker build .`.
FROM runtime AS order-svc
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/order-svc", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/order-svc"]
