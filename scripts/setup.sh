#!/usr/bin/env bash
# Creates .venv with the pinned dependencies and the package (editable), idempotently.
#
# Trap on CPU-only build machines: pip may be configured (PIP_FIND_LINKS or pip.conf find-links)
# with a local CPU-only torch wheel, but no CPU build of the matching torchvision exists on the
# registry, and the registry's torchvision fails to import next to a CPU-only torch
# ("operator torchvision::nms does not exist"). Installing torch and torchvision together from
# the registry (CUDA builds, which also run without a GPU) avoids the mismatch, so local
# find-links are switched off for this install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, ray, pydensecrf.densecrf, pycocotools, irnet_ray, moto, pytest_timeout" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  empty_links="$(mktemp -d)"
  PIP_FIND_LINKS="$empty_links" .venv/bin/python -m pip install --disable-pip-version-check -q \
    --find-links "$empty_links" -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  rmdir "$empty_links"
  .venv/bin/python -c "import torch, torchvision, ray, pydensecrf.densecrf, pycocotools, irnet_ray, moto, pytest_timeout"
  touch .venv/.installed
fi
