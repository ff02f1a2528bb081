# syntax=docker/dockerfile:1
# confroute image: confroute-controller, confroute-node and confroute-ctl on Debian slim,
# running as an unprivileged user. The Helm chart picks the binary with the container command.
#
#   docker build -t confroute:dev .
#   docker run --rm -p 5060:5060/udp -p 5060:5060 -p 8080:8080 \
#     -e CONFROUTE_REDIS__URL=redis://redis:6379 confroute:dev confroute-controller

# The toolchain the project is built and tested with (rust-version in Cargo.toml is the floor).
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# Manifests and sources of every workspace member: cargo reads the whole workspace even when
# it builds two packages.
COPY Cargo.toml Cargo.lock ./
COPY shared ./shared
COPY controller ./controller
COPY conference-node ./conference-node
COPY tests ./tests
RUN --mount=type=cache,id=confroute-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=confroute-target,target=/src/target \
    cargo build --release --locked -p confroute-controller -p confroute-node --bins \
 && install -D -m 0755 -t /out \
      target/release/confroute-controller \
      target/release/confroute-ctl \
      target/release/confroute-node

FROM debian:${DEBIAN_RELEASE}-slim
# ca-certificates: rediss:// and https status callbacks. curl: the node pod's preStop hook
# drains the agent over HTTP.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 confroute \
 && useradd --system --uid 10001 --gid confroute --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin confroute
COPY --from=build /out/ /usr/local/bin/
LABEL org.opencontainers.image.title="confroute" \
      org.opencontainers.image.description="Conference router for Asterisk: controller, node agent and CLI" \
      org.opencontainers.image.source="https://github.com/confroute/confroute" \
      org.opencontainers.image.licenses="Apache-2.0"
# Numeric, so Kubernetes can check runAsNonRoot.
USER 10001:10001
# SIP (controller), HTTP API (controller), agent HTTP (node).
EXPOSE 5060/udp 5060/tcp 8080/tcp 9090/tcp
CMD ["confroute-controller"]
