# syntax=docker/dockerfile:1
# Build stage: the pinned toolchain of rust-toolchain.toml.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p courier \
 && cp target/release/courier /usr/local/bin/courier

# Runtime stage: the one binary, the example config, a non-root user.
FROM debian:bookworm-slim
RUN (dpkg -s ca-certificates >/dev/null 2>&1 \
     || (apt-get update \
         && apt-get install -y --no-install-recommends ca-certificates \
         && rm -rf /var/lib/apt/lists/*)) \
 && useradd --system --uid 10001 --home-dir /data courier \
 && mkdir -p /data \
 && chown courier /data
COPY --from=build /usr/local/bin/courier /usr/local/bin/courier
COPY --chown=courier config /config
ENV COURIER_CONFIG_DIR=/config \
    COURIER_DATA_DIR=/data
USER courier
ENTRYPOINT ["courier"]
CMD ["--help"]
