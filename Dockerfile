# fleetsim: the fleet daemon and the emulator in one small image.
#   docker build -t fleetsim .
#   docker run --rm -p 9100:9100 fleetsim                    # demo fleet + embedded emulator
#   docker run --rm -p 8883:8883 -p 8443:8443 fleetsim hub --config /etc/fleetsim/hub.toml
# The build stage compiles with the toolchain pinned here; the runtime stage holds the binary,
# CA roots and the shipped scenarios, and runs as an unprivileged user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY testkit testkit
RUN cargo build --release --locked --bin fleetsim \
 && strip target/release/fleetsim

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/fleetsim --create-home fleetsim
COPY --from=build /src/target/release/fleetsim /usr/local/bin/fleetsim
COPY scenarios /etc/fleetsim/scenarios
COPY models /etc/fleetsim/models
COPY deploy/docker/config.toml deploy/docker/hub.toml /etc/fleetsim/
USER 10001
WORKDIR /var/lib/fleetsim
# 8883 device MQTT/TLS, 8443 service API + DPS + WebSockets, 9100 fleet metrics, 9464 hub metrics
EXPOSE 8883 8443 9100 9464
ENTRYPOINT ["/usr/local/bin/fleetsim"]
CMD ["run", "--config", "/etc/fleetsim/config.toml"]
