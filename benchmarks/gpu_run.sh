#!/usr/bin/env bash
# On the GPU machine, from the repository root, after benchmarks/gpu_prepare.sh here: install the carried wheels beside
# the image's PyTorch, run the gpu-marked tests and the analysis tests a CUDA device reaches ("auto" is CUDA there),
# then benchmarks/gpu.py part by part (one part failing leaves the others' figures). Figures land in $OUT (or /tmp).
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-/tmp}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/hrsa  # the repository root is the hrsa package
export PYTHONPATH=/tmp/site:/tmp/pkg PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc; free -g | head -2; df -h /tmp | tail -1
python3 -c "import torch, transformers, zarr; print('torch', torch.__version__, 'transformers', transformers.__version__,
  'zarr', zarr.__version__, 'cuda', torch.cuda.is_available())" || exit 1
# Parts to run (default all): e.g. `bash benchmarks/gpu_run.sh tests cka cka30k` when extraction was measured already.
parts=${*:-tests faiss extract cka}
for part in $parts; do
  date +%T
  case $part in
    tests) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/analyze/test_backends.py \
             tests/analyze/test_compute_dtype.py tests/analyze/test_cross_layer.py tests/analyze/test_ray.py 2>&1 | tail -25 ;;
    faiss) timeout 60 python3 benchmarks/gpu.py --only faiss ;;  # the lent H200's image has no faiss: seconds
    extract) timeout 150 python3 benchmarks/gpu.py --only extract --dir /tmp --json "$out/extract.json" 2>&1 | grep -v "it/s\]" ;;
    cka) timeout 330 python3 benchmarks/gpu.py --only cka --dir /tmp --json "$out/cka.json" ;;  # N = 100,000
    cka30k) timeout 120 python3 benchmarks/gpu.py --only cka --tokens 30000 --dir /tmp --json "$out/cka30k.json" ;;  # as first measured
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
date +%T
