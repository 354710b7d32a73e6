#!/usr/bin/env bash
# The one script to run on a lent H200 (the device tool's `run`), from the repository root.
#
#   here, once:     ../shared/gpu/wheels.sh       fills .whl/ (diffusers, deepspeed, lmdb, ... for Python 3.12)
#   device `run`:   command "bash benchmarks/gpu_run.sh", carry [".whl"], timeout_s 600
#   afterwards:     copy report/gpu_report.{json,md} from the files that come back into
#                   benchmarks/results/gpu_<date>/ and run `python benchmarks/update_readme.py benchmarks/results`
#
# 1. installs .whl/*.whl into a temporary folder on PYTHONPATH (no index, no deps: the machine reaches
#    nothing) and lays this package out there as setup.py installs it (links: repa_fast/ with kernels/ as
#    repa_fast.kernels), so no build step is needed; pytest runs with -P so that the source folder
#    repa_fast/ (which lacks kernels) does not shadow it;
# 2. the GPU tests of the kernels: bf16 correctness at the real shapes (REPA_FAST_GPU_TESTS=1, -m gpu);
# 3. benchmarks/gpu_report.py into $OUT/report (it writes its files after every part, so a run cut short
#    keeps the parts it finished), with any arguments given to this script (e.g. --parts op,overhead);
# then prints the statuses and, last, the report's table. Logs: $OUT/tests.log, $OUT/report.log.
# Time limits: tests 100 s, report 450 s (its full run is sized for that limit but not yet timed with the
# four-op op part and setup's self-checks; at the limit the step part, which runs last, is the one cut):
# with the install, within one 600 s command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/gpu_run.XXXXXX)}
mkdir -p "$OUT/report"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real compiler, not the interpreter

site=$(mktemp -d /tmp/site.XXXXXX)
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_run: no .whl/*.whl: run ../shared/gpu/wheels.sh here and carry .whl" >&2
    exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
    || { echo "gpu_run: installing .whl/*.whl failed" >&2; exit 1; }
mkdir -p "$site/repa_fast"
for f in repa_fast/*; do ln -s "$PWD/$f" "$site/repa_fast/"; done
ln -s "$PWD/kernels" "$site/repa_fast/kernels"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -P -c "import torch, triton, repa_fast.kernels.align_head as k
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available(), k.__file__)" \
    || { echo "gpu_run: the package does not import" >&2; exit 1; }

REPA_FAST_GPU_TESTS=1 timeout 100 python3 -P -m pytest -p no:cacheprovider -q -m gpu \
    tests/test_kernel_align_head.py tests/test_kernel_align_loss.py tests/test_kernel_token_gram.py \
    tests/test_kernel_align_branch.py tests/test_selfcheck.py \
    2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}

timeout 450 python3 benchmarks/gpu_report.py --out "$OUT/report" "$@" 2>&1 | tee "$OUT/report.log"
report=${PIPESTATUS[0]}

echo
echo "gpu_run: GPU tests exit $tests ($(tail -n 1 "$OUT/tests.log"))"
echo "gpu_run: gpu_report exit $report$([ "$report" -eq 124 ] && echo ': stopped at its time limit; the finished parts are in the files')"
if [ -f "$OUT/report/gpu_report.md" ]; then
    grep -E '^- (date|machine|wall time)' "$OUT/report/gpu_report.md"
    grep '^|' "$OUT/report/gpu_report.md"
fi
[ "$tests" -eq 0 ] && [ "$report" -eq 0 ]
