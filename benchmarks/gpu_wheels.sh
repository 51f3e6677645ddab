#!/usr/bin/env bash
# Download, here, the wheels the GPU benchmark (benchmarks/gpu_label.sh) needs that the GPU
# machine lacks, into .whl/ (ignored by git; gpu_label.sh installs them there, offline).
#
# The GPU machine (one H200) has Python 3.12, torch 2.11 (cu130), torchvision 0.26, NumPy,
# SciPy, pyarrow and Pillow, and no network. The benchmark imports only the labeling inference
# path: torch, torchvision (the ResNet backbones; it pulls in Pillow), NumPy and SciPy
# (instance map, synthetic images); gpu_label.py checks at run time that Ray, boto3,
# pycocotools and pydensecrf stay unimported. So today nothing is missing and this script
# downloads nothing. If the path grows a dependency, add it to NEEDED (pip name==version) and
# leave it out of ON_DEVICE.
set -euo pipefail

# pip names the benchmark imports, pinned where a download would need a version.
NEEDED=(torch torchvision numpy scipy pillow)
# pip names the GPU machine's Python already has.
ON_DEVICE=(torch torchvision numpy scipy pyarrow pillow)
# Platforms pip must match exactly for a CPython 3.12 x86-64 Linux machine.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

missing=()
for need in "${NEEDED[@]}"; do
    name="${need%%==*}"
    found=0
    for have in "${ON_DEVICE[@]}"; do [[ "$have" == "$name" ]] && found=1; done
    [[ $found == 1 ]] || missing+=("$need")
done

if [[ ${#missing[@]} == 0 ]]; then
    echo "no wheels needed: the GPU machine has every package the benchmark imports (${NEEDED[*]}); nothing downloaded"
    exit 0
fi

platform_flags=()
for p in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$p"); done
mkdir -p .whl
echo "downloading for cp312 manylinux x86-64 into .whl/: ${missing[*]}"
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_flags[@]}" -d .whl "${missing[@]}"
ls -l .whl
