#!/usr/bin/env bash
# GPU proof for issue 3: one command on the device machine (Python 3.12, torch + CUDA, triton,
# nvcc; no network). Builds the extension offline, runs the whole test suite on CUDA tensors,
# then times every kernel (bench/gpu/bench_gpu.py): table last, JSON + logs in $OUT.
# Budget (H100, < 7 min in all): build <= 100 s, tests <= 180 s (the two-process CPU tests of the
# driver add about a minute), benchmarks <= 130 s.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

echo "== build (pip install --no-build-isolation --no-deps -e .)"
export MAX_JOBS=16
timeout 100 pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1
build_rc=$?
tail -3 "$OUT/build.log"
python -c "from repforget_kernels import _cpp_ops; print('cuda ops:', _cpp_ops.cuda_available()); print('cpp ops:', _cpp_ops.available())" | tee -a "$OUT/gpu.txt"

echo "== tests on CUDA tensors"
REPFORGET_TEST_DEVICE=cuda timeout 180 python -m pytest -x -q -p no:cacheprovider tests >"$OUT/tests.log" 2>&1
tests_rc=$?
tail -15 "$OUT/tests.log"

echo "== benchmarks"
timeout 130 python bench/gpu/bench_gpu.py --out "$OUT" 2>"$OUT/bench.stderr"
bench_rc=$?
tail -3 "$OUT/bench.stderr"
echo "build rc=$build_rc tests rc=$tests_rc bench rc=$bench_rc (logs and bench_gpu.json in $OUT)"
exit $(( build_rc || tests_rc || bench_rc ))
