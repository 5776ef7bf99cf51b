# sandboxd container image. Base images are build arguments so the image can be built without a
# registry from locally imported bases, e.g.:
#   docker build --build-arg BUILDER_IMAGE=local/rust:1 --build-arg RUNTIME_IMAGE=local/debian:12 .
# The container needs the Docker socket of the engine it manages (-v /var/run/docker.sock:...)
# and the host directories of the config (chats root, dependencies, tools) at the same paths.
ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY migrations ./migrations
COPY src ./src
RUN cargo build --release --locked --bin sandboxd

FROM ${RUNTIME_IMAGE}
COPY --from=build /src/target/release/sandboxd /usr/local/bin/sandboxd
COPY config/sandboxd.yaml /etc/sandboxd/sandboxd.yaml
ENV SANDBOXD_CONFIG=/etc/sandboxd/sandboxd.yaml \
    APP_DATABASE_PATH=/var/lib/sandboxd/sandboxd.db
WORKDIR /var/lib/sandboxd
EXPOSE 8123
ENTRYPOINT ["/usr/local/bin/sandboxd"]
CMD ["serve"]
