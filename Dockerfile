# sandboxd container image (multi-stage). Base images are build arguments, so the image can be
# built without a registry: scripts/make-base-images.sh makes local ones and
# scripts/docker-build.sh builds and checks the image with them.
#
# Run it with the socket of the engine it manages, and the host directories of its config
# (chats root, dependencies, tools, allowed volume roots) mounted at the same paths:
#   docker run -v /var/run/docker.sock:/var/run/docker.sock --group-add $(stat -c %g /var/run/docker.sock) ...
ARG BUILDER_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${BUILDER_IMAGE} AS build
ARG CARGO_FLAGS=
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY migrations ./migrations
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked ${CARGO_FLAGS} --bin sandboxd \
 && cp target/release/sandboxd /usr/local/bin/sandboxd

FROM ${RUNTIME_IMAGE}
COPY --from=build /usr/local/bin/sandboxd /usr/local/bin/sandboxd
COPY config/sandboxd.yaml /etc/sandboxd/sandboxd.yaml
ENV SANDBOXD_CONFIG=/etc/sandboxd/sandboxd.yaml \
    APP_DATABASE_PATH=/var/lib/sandboxd/sandboxd.db \
    APP_HTTP_HOST=127.0.0.1
WORKDIR /var/lib/sandboxd
USER sandboxd
EXPOSE 8123
HEALTHCHECK --interval=30s --timeout=3s CMD ["/usr/local/bin/sandboxd", "probe"]
ENTRYPOINT ["/usr/local/bin/sandboxd"]
CMD ["serve"]
