# Container images of the gate and the operator for users with a Docker
# engine. NOT built or tested here: the project builds its images without an
# engine (`cargo xtask images`, see the README's "Container images"), and
# those are the images whose digests the manifests pin. This file gives
# equivalent images (same binary, non-root user 65532, no shell), not
# bit-identical ones.
#
#   docker build --target webhook -t confidential-webhook .
#   docker build --target controllers -t confidential-controllers .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN apt-get update && apt-get install -y --no-install-recommends libtss2-dev libclang-dev clang pkg-config \
 && cargo build --release -p confidential-webhook -p confidential-controllers

FROM gcr.io/distroless/cc-debian12:nonroot AS webhook
COPY --from=build /src/target/release/confidential-webhook /confidential-webhook
USER 65532:65532
ENTRYPOINT ["/confidential-webhook"]

FROM gcr.io/distroless/cc-debian12:nonroot AS controllers
COPY --from=build /src/target/release/confidential-controllers /confidential-controllers
USER 65532:65532
ENTRYPOINT ["/confidential-controllers"]
