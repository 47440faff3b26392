# Images for both binaries (docker build --target agent|operator). scripts/images.sh writes
# the same images without a Docker engine (same binaries, entrypoints, users and files:
# the binary, glibc and libgcc_s, CA certificates); see the README.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p node-agent -p operator \
 && strip target/release/crashwatch-agent target/release/crashwatch-operator

# The agent runs as root for /dev/kmsg and the host's files (the chart runs it privileged:
# see agent in values.yaml); CA certificates for https debuginfod.
FROM gcr.io/distroless/cc-debian12 AS agent
COPY --from=build /src/target/release/crashwatch-agent /usr/bin/crashwatch-agent
ENTRYPOINT ["/usr/bin/crashwatch-agent"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/crashwatch-operator /usr/bin/crashwatch-operator
USER 65532:65532
ENTRYPOINT ["/usr/bin/crashwatch-operator"]
