# GPU SDK container for the Dataflow workers of the BiT tagging job (see docs/dataflow.md).
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/bit-tagger/bit-tagger-gpu:latest .
#   docker build --build-arg BAKE_WEIGHTS=1 -t ... .    # also bake weights/*.npz into the image
#   gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT/bit-tagger/bit-tagger-gpu:latest .
# (BuildKit, the default builder of current Docker, skips the unused weights stage; use
# DOCKER_BUILDKIT=1 with older ones.)
#
# Base: Beam's own Python 3.11 SDK image, not tensorflow/tensorflow:2.21.0-gpu. The Beam image gives
# exactly the launcher's Beam (2.77.0) and a current CPython 3.11 with /opt/apache/beam/boot as its
# entrypoint; the TensorFlow images ship Ubuntu's Python 3.11.0rc1 (tensorflow/tensorflow#82529), a
# release candidate, with Beam to be added on top. CUDA 12 and cuDNN 9 come as pip wheels through
# `tensorflow[and-cuda]` (no CUDA base image needed); the NVIDIA driver is installed on the worker
# VM by Dataflow (`worker_accelerator=...;install-nvidia-driver`) and mounted at /usr/local/nvidia.
# The launcher's Python minor version must match the image's (3.11); run.sh ensures that locally.

ARG BEAM_VERSION=2.77.0
ARG BAKE_WEIGHTS=0

# ---- dependencies: the slow, rarely changing layers ----------------------------------------------
FROM apache/beam_python3.11_sdk:${BEAM_VERSION} AS deps
ARG TF_VERSION=2.21.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    PATH=/usr/local/nvidia/bin:${PATH} \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true
WORKDIR /opt/bit-tagger
COPY requirements.txt ./
# requirements.txt pins apache-beam[gcp]==2.77.0 (already in the base image) and tensorflow; the
# and-cuda extra adds the CUDA/cuDNN wheels (and ptxas, which XLA needs). A TF_VERSION that differs
# from requirements.txt fails here, loudly.
RUN pip install -r requirements.txt "tensorflow[and-cuda]==${TF_VERSION}" \
 && pip check \
 && python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version"

# ---- optional baked weights (BAKE_WEIGHTS=1): workers then download nothing ------------------------
# weights/NAME.npz is baked as the cached copy of gs://bit_models/NAME.npz (the job's default model
# sources), where model/checkpoint.py's `cache_path` looks: $BIT_CACHE_DIR/gs/bit_models/NAME.npz,
# next to NAME.npz.meta.json ({"source", "size", "sha256"}) that marks the copy complete. The layout
# is checked with checkpoint.py's own `cache_path`. The stage is chosen by name in the final stage;
# BuildKit skips the unused one (the legacy builder builds it too, harmlessly: weights/ then holds
# only its README).
FROM deps AS weights-0
ENV BIT_CACHE_DIR=/opt/bit-tagger/models
RUN mkdir -p "${BIT_CACHE_DIR}"

FROM deps AS weights-1
ENV BIT_CACHE_DIR=/opt/bit-tagger/models
COPY weights/ ${BIT_CACHE_DIR}/gs/bit_models/
COPY model/checkpoint.py /tmp/bake/bake_checkpoint.py
RUN printf '%s\n' \
      'import glob, json, os, sys' \
      'sys.path.insert(0, "/tmp/bake")' \
      'from bake_checkpoint import cache_path, _sha256_file' \
      'for path in sorted(glob.glob(os.environ["BIT_CACHE_DIR"] + "/gs/bit_models/*.npz")):' \
      '    source = "gs://bit_models/" + os.path.basename(path)' \
      '    assert cache_path(source) == path, (cache_path(source), path)' \
      '    meta = {"source": source, "size": os.path.getsize(path), "sha256": _sha256_file(path)}' \
      '    with open(path + ".meta.json", "w") as f:' \
      '        json.dump(meta, f)' \
      '    print("baked", meta)' \
      > /tmp/bake/bake.py \
 && python /tmp/bake/bake.py \
 && rm -rf /tmp/bake

# ---- the project: the layer that changes with every code change ------------------------------------
FROM weights-${BAKE_WEIGHTS} AS final
ARG BAKE_WEIGHTS
COPY setup.py requirements.txt ./
COPY core/ core/
COPY pipeline/ pipeline/
COPY transforms/ transforms/
COPY model/ model/
COPY core/ core/
# search/ is not used by workers, but setup.py packages it: without it `pip install .` fails.
COPY search/ search/
# The fused CPU GroupNorm kernel (model/kernels), compiled here once so workers never compile it
# (used by CPU-only workers, `--cpu_only`; GPU workers use TF ops on the GPU).
ENV BIT_TAGGER_KERNEL_DIR=/opt/bit-tagger/kernels
RUN pip install --no-deps . \
 && rm -rf build *.egg-info \
 && cd / \
 && python -c "import pipeline.main, pipeline.report, transforms.infer, model.bit, model.labels; model.labels.imagenet21k()" \
 && (command -v g++ >/dev/null || (apt-get update && apt-get install -y --no-install-recommends g++ \
     && rm -rf /var/lib/apt/lists/*)) \
 && CUDA_VISIBLE_DEVICES= python -m model.kernels \
 && if [ "${BAKE_WEIGHTS}" = "1" ]; then \
      ls "${BIT_CACHE_DIR}"/gs/bit_models/*.npz.meta.json \
      || { echo "BAKE_WEIGHTS=1 but weights/ holds no .npz files" >&2; exit 1; }; \
    fi
WORKDIR /
# The Beam SDK harness boot program (already the base image's entrypoint; stated for clarity).
ENTRYPOINT ["/opt/apache/beam/boot"]
