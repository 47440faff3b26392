# Images for both binaries (docker build --target agent|operator). Not buildable on the
# development VM (no Docker engine there); see the README.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p node-agent -p operator \
 && strip target/release/crashwatch-agent target/release/crashwatch-operator

# The agent needs root for /dev/kmsg and the host's files (the chart drops every capability
# but SYSLOG, SYS_PTRACE and DAC_READ_SEARCH); CA certificates for https debuginfod.
FROM gcr.io/distroless/cc-debian12 AS agent
COPY --from=build /src/target/release/crashwatch-agent /usr/bin/crashwatch-agent
ENTRYPOINT ["/usr/bin/crashwatch-agent"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/crashwatch-operator /usr/bin/crashwatch-operator
USER 65532:65532
ENTRYPOINT ["/usr/bin/crashwatch-operator"]
