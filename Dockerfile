# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY sql sql
COPY benches benches
RUN cargo build --release --locked --bin agent-connection-manager

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin acm
WORKDIR /app
COPY --from=build /src/target/release/agent-connection-manager /usr/local/bin/agent-connection-manager
COPY config config
USER 10001
ENV ACM_HTTP__LISTEN=0.0.0.0:9090
EXPOSE 9090
ENTRYPOINT ["agent-connection-manager"]
CMD ["run"]
