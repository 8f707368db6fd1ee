#!/usr/bin/env bash
# Fill carry/ (git-ignored) with what benchmarks/gpu_check.sh needs on the GPU machine and cannot
# download there. Run it on this (CPU) machine, in the root of the checkout the device call sends,
# before the call; then name "carry" in the call's carry list.
#
#   bash benchmarks/gpu_carry.sh [--out DIR] [--data DIR] [--python-version 3.12]
#
# (a) carry/wheels: the wheels of what the GPU path imports (prepare, loader, train, the tests) that
#     the machine's image lacks: simplejpeg, cryptography and cffi (+ pycparser, cffi's declared
#     dependency), at the versions installed here (what CI tests), built for CPython 3.12 on
#     manylinux x86-64 (the image's python3 is 3.12.3; --python-version to change). Everything else
#     the path imports (torch, torchvision, triton, timm, numpy, pillow, click, tqdm, pyyaml, fsspec,
#     matplotlib, pytest) is in the image. The dependency closure of the wheels is checked against
#     the image's package list below. Found by recording every module the CPU run of gpu_check.py
#     (--smoke --device cpu) imported: pydantic, imagecodecs and prefect are not among them.
# (b) carry/data/cifar10-jpeg.tar.xz: all 60,000 CIFAR-10 JPEG q75 copies of the shared folder
#     (../shared/data does not travel), byte for byte, as one tar.xz (~19 MB instead of 65 MB of
#     zips: xz removes the ~620 header bytes every 32 px JPEG repeats). gpu_check.py unpacks it.
#     Made once (~2 min); kept while the source zips are unchanged.
# The size of what the call sends (tracked files + carry) is printed; the limit is 64 MiB.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="$REPO/carry"
DATA=""
PYVER="3.12"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --python-version) PYVER="$2"; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_carry.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
WHEELS="simplejpeg cryptography cffi pycparser"
# python3 -m pip list of the GPU machine's image (as read on 2026-11-17, /work/.library/device/KINDS.md)
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"

if ! git -C "$REPO" check-ignore -q "$OUT/x" 2>/dev/null; then
  echo "gpu_carry.sh: $OUT is not git-ignored; the device call would send it twice" >&2
  exit 2
fi
mkdir -p "$OUT/wheels" "$OUT/data"

# (a) wheels, pinned to the versions installed here
rm -f "$OUT"/wheels/*.whl
for name in $WHEELS; do
  ver="$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)"
  spec="$name${ver:+==$ver}"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT/wheels" "$spec"
done
"$PY" - "$OUT/wheels" "$PYVER" "$DEVICE_HAS" <<'PY'
"""Every requirement of the carried wheels must be carried or in the image (markers for CPython on Linux)."""
import sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

folder, pyver, device = Path(sys.argv[1]), sys.argv[2], {canonicalize_name(n) for n in sys.argv[3].split()}
env = {"python_version": pyver, "python_full_version": pyver + ".3", "platform_python_implementation": "CPython",
       "implementation_name": "cpython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
wheels = sorted(folder.glob("*.whl"))
carried = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                name = canonicalize_name(req.name)
                if name not in carried and name not in device:
                    missing.append(f"{w.name} needs {req}")
    print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
if missing:
    sys.exit("gpu_carry.sh: not carried and not on the GPU machine:\n  " + "\n  ".join(missing))
PY

# (b) the CIFAR-10 JPEG copies, packed once
if [ -z "$DATA" ]; then
  for cand in "${ETC_DATA_SHARED:-}" "$REPO/../shared/data" "$REPO/shared/data"; do
    if [ -n "$cand" ] && [ -f "$cand/cifar10-train-jpeg.zip" ]; then DATA="$cand"; break; fi
  done
fi
if [ -z "$DATA" ] || [ ! -f "$DATA/cifar10-train-jpeg.zip" ] || [ ! -f "$DATA/cifar10-test-jpeg.zip" ]; then
  echo "gpu_carry.sh: no cifar10-{train,test}-jpeg.zip found (--data DIR)" >&2
  exit 2
fi
stamp="$(cd "$DATA" && sha256sum cifar10-train-jpeg.zip cifar10-test-jpeg.zip)"
if [ -f "$OUT/data/cifar10-jpeg.tar.xz" ] && [ "$(cat "$OUT/data/cifar10-jpeg.sources" 2>/dev/null)" = "$stamp" ]; then
  echo "  data: $OUT/data/cifar10-jpeg.tar.xz is up to date"
else
  echo "  data: packing $DATA/cifar10-{train,test}-jpeg.zip (about 2 minutes)"
  rm -f "$OUT/data/cifar10-jpeg.sources"
  PYTHONPATH="$REPO" "$PY" "$REPO/benchmarks/gpu_check.py" pack-data "$OUT/data/cifar10-jpeg.tar.xz" \
    "$DATA/cifar10-train-jpeg.zip" "$DATA/cifar10-test-jpeg.zip"
  echo "$stamp" > "$OUT/data/cifar10-jpeg.sources"
fi

# what the device call sends: tracked and untracked-not-ignored files, plus this folder
"$PY" - "$REPO" "$OUT" <<'PY'
import os, subprocess, sys
from pathlib import Path
repo, out = Path(sys.argv[1]), Path(sys.argv[2])
names = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.split(b"\0")
tree = sum((repo / os.fsdecode(n)).stat().st_size for n in names if n and (repo / os.fsdecode(n)).is_file())
carry = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
total = (tree + carry) / 2**20
print(f"gpu_carry.sh: {out} holds {carry / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB) "
      f"a device call sends {total:.1f} MiB of the 64 MiB allowed")
sys.exit(0 if total < 64 else "gpu_carry.sh: over the 64 MiB a device call may send")
PY
