# quantbench with the CUDA backend, for Kubernetes or any GPU cloud.
#
#   docker build --build-arg QUANTBENCH_GIT_COMMIT=$(git rev-parse HEAD) -t quantbench:cuda .
#   docker run --gpus all -v $PWD/results:/work/results -v $HOME/.cache/quantbench:/cache \
#       quantbench:cuda compare --model smollm2-135m --device cuda
#
# Stage 1 compiles with `--features cuda`. The CUDA backend loads the driver,
# cuBLAS/cuBLASLt and NVRTC at run time and compiles its kernels with NVRTC,
# so the build stage needs Rust only, no CUDA toolkit. Stage 2 is NVIDIA's
# CUDA runtime image, which ships cuBLAS and NVRTC; the driver (libcuda)
# comes from the host through the NVIDIA container toolkit.
#
# This image has not been built in the development environment (no Docker
# daemon, no registry access there); see docs/scale-out.md.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

FROM ${RUST_IMAGE} AS build
ARG QUANTBENCH_GIT_COMMIT=""
ENV QUANTBENCH_GIT_COMMIT=${QUANTBENCH_GIT_COMMIT}
# The binary finds scripts/ relative to the directory it was built in, so
# the runtime stage puts them at the same path.
WORKDIR /opt/quantbench
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY benches benches
COPY configs configs
COPY data data
COPY assets assets
RUN cargo build --release --locked --features cuda --bin quantbench

FROM ${CUDA_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/quantbench/target/release/quantbench /usr/local/bin/quantbench
COPY scripts /opt/quantbench/scripts
# Models (smollm2-135m, hub downloads) are cached here: mount a volume.
ENV QUANTBENCH_CACHE=/cache
WORKDIR /work
ENTRYPOINT ["quantbench"]
CMD ["--help"]
