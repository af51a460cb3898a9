# One image with every binary: the nine workers and chctl, in /usr/local/bin. The Helm chart
# (helm/cipherhorizon) runs each worker from it by name, and `chctl setup` as its set-up job.
#   docker build -t cipherhorizon:0.1.0 .
# Not built by `make test`: these machines have no container engine (see the chart's README).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
    && mkdir /out \
    && find target/release -maxdepth 1 -type f -executable -exec cp {} /out/ \;

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The chart's pods run as this user, with a read-only root file system: the workers write
# nothing but their logs, to stdout.
USER 65532:65532
ENV CH_LOG_FORMAT=json
