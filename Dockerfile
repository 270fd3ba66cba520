# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
#   docker build -t agent-connection-manager .      (or: docker compose up -d --build)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY sql sql
COPY benches benches
RUN cargo build --release --locked --bin agent-connection-manager

FROM debian:bookworm-slim
# Not pinned to exact versions on purpose: the base image fixes the Debian release, and within it an exact pin would
# break the build (and keep out security fixes) each time bookworm-security replaces a version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin acm
WORKDIR /app
COPY --from=build /src/target/release/agent-connection-manager /usr/local/bin/agent-connection-manager
# config/default.toml is read from the working directory; ACM_* variables override it.
COPY config config
USER 10001
ENV ACM_HTTP__LISTEN=0.0.0.0:9090
EXPOSE 9090
# Healthy once /readyz answers 200: broker connected, database reachable, consumers running (bash, no curl needed).
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["agent-connection-manager"]
CMD ["run"]
