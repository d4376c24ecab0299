#!/usr/bin/env bash
# The GPU check on a bare GPU machine that has PyTorch, in one call of at most 10 minutes:
#   bash benchmarks/gpu_session.sh [FOLDER]     # FOLDER defaults to $OUT
# installs this package without its dependencies, then runs benchmarks/gpu_check.py into
# FOLDER/gpu-check (report.md, gpu-check.json, the cuda suite's log and JUnit XML), with its log
# and the machine's description (nvidia-smi, versions) beside it. Exit status: gpu_check's.
#
# What the check imports: torch, torchvision, timm (>= 1.0.23: VisionTransformer's attn_layer),
# numpy, pillow, pyyaml, tqdm, pandas, matplotlib, seaborn, scikit-learn (the digits dataset, with
# scipy, joblib and threadpoolctl) and pytest; the image of this project's lent machines has them
# all. Not needed: fvcore, jsonschema, snakemake, snakemake-executor-plugin-slurm, selenium.
# A wheel missing there or too old (timm, say) goes in wheels/: installed first, with no index.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:?give the output folder as the first argument or in OUT}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=python3

if compgen -G "wheels/*.whl" >/dev/null; then
    $python -m pip install -q --no-index --no-deps --no-cache-dir wheels/*.whl || exit 1
fi
# no index there: setuptools as installed builds the editable package; failing that, the source tree
$python -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . \
    || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
    nvidia-smi
    $python -c "import sys, torch, timm, sklearn, gmmvit; print('python', sys.version.split()[0], '| torch',
torch.__version__, 'CUDA', torch.version.cuda, '| timm', timm.__version__, '| scikit-learn', sklearn.__version__,
'| gmmvit from', gmmvit.__file__)"
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

# 25,000 images (75,000 an epoch at 3 passes) keep the call inside its 10 minutes; img/s is a rate
$python benchmarks/gpu_check.py --out "$out/gpu-check" --train-images 25000 2>&1 | tee "$out/gpu-check.log"
exit "${PIPESTATUS[0]}"
