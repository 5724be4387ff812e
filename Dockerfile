# crier in a container: `docker build -t crier .` then
#   docker run -p 7700:7700 -v crier-data:/data crier
# Settings come as CRIER_* variables (docker run -e CRIER_PUBLISHER_KEYS=...) or a file
# mounted at /etc/crier/crier.toml with CRIER_CONFIG=/etc/crier/crier.toml.
# docs/operations.md: install, TLS, logs, backup and upgrade.

# Base images, replaceable with --build-arg (scripts/image-check builds on a local Debian
# root made with mmdebstrap when no registry can be reached):
#   BUILD_BASE  has Rust 1.85+ and a C compiler (ring, jemalloc);
#   RUN_BASE    is Debian 12 (bookworm) or a glibc as new, with bash and useradd.
# BINARY=context takes a crier binary already built for that Debian from dist/crier in
# the build context instead of compiling; BUILD_BASE then needs no Rust (pass the run base).
# Behind a proxy that re-signs TLS, give the compile stage its CA bundle as a build secret
# (it is not kept in the image): `--secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt`.
ARG BUILD_BASE=rust:1.95-bookworm
ARG RUN_BASE=debian:bookworm-slim

# --- build: the release binary, with the crates cached apart from the sources ---------
# Without its debug info (the repository's release profile keeps it for profiling): 20 MB
# instead of 114 MB.
FROM ${BUILD_BASE} AS build
ARG BINARY=build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    --mount=type=secret,id=cacert,required=false \
    if [ -f /run/secrets/cacert ]; then \
        export CARGO_HTTP_CAINFO=/run/secrets/cacert SSL_CERT_FILE=/run/secrets/cacert; \
    fi; \
    if [ "$BINARY" = context ]; then \
        install -m 755 dist/crier /usr/local/bin/crier; \
    else \
        cargo build --release --locked --bin crier --config 'profile.release.strip="debuginfo"' \
        && cp target/release/crier /usr/local/bin/crier; \
    fi

# --- run: Debian slim, the binary, a user without privileges --------------------------
FROM ${RUN_BASE}
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin crier \
 && mkdir -p /data /etc/crier && chown crier:crier /data
COPY --from=build /usr/local/bin/crier /usr/local/bin/crier
USER crier
WORKDIR /data
# The data directory (leaderboards, durable history): a volume, so it outlives the
# container. Back it up as docs/operations.md says.
VOLUME ["/data"]
ENV CRIER_LISTEN=0.0.0.0:7700 \
    CRIER_DATA_DIR=/data \
    CRIER_LOG_FORMAT=json
EXPOSE 7700
# /healthz answers 200 while the process serves; bash's /dev/tcp needs no extra package.
# (With --tls-cert, probe from outside or use the orchestrator's HTTPS check instead.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/7700 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -c 12 <&3 | grep -q ' 200'"]
# SIGTERM is the graceful drain: stop accepting, let clients drain for drain_timeout
# (default 5 s), close them with 1001. Keep `docker stop -t` (default 10 s) above it.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/crier"]
CMD ["serve"]
