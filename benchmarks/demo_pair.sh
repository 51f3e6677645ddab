#!/usr/bin/env bash
# The demo (the README's first command) of two commits back to back on the same machine:
# BASE (default 5fd9bd9, the last commit before the batched inference pipeline) and the
# working tree. Each runs from a clean work folder with the same .venv; BASE from a git
# worktree, put first on PYTHONPATH (the driver and the Ray workers it starts import it).
# Prints the stage timings and the quality figures of both runs (docs/benchmarks.md, "The demo").
#
#   bash benchmarks/demo_pair.sh [BASE] [OUT]      # about 30 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-5fd9bd9}
out=${2:-/tmp/demo_pair}
python=$PWD/.venv/bin/python
rm -rf "$out" && mkdir -p "$out"
git worktree add --force --detach "$out/base-src" "$base" >/dev/null
trap 'git worktree remove --force "$out/base-src"' EXIT
for which in base current; do
  src=$PWD
  [ "$which" = base ] && src=$out/base-src
  started=$(date +%s)
  (cd "$src" && PYTHONPATH=$src "$python" -c "import sys; from irnet_ray.cli import main; sys.exit(main())" \
     demo --workdir "$out/$which/work" --report "$out/$which/report.json") >"$out/$which.log" 2>&1
  echo "$which: $(( $(date +%s) - started )) s wall, load average $(cut -d' ' -f1-3 /proc/loadavg)"
done
"$python" - "$out" <<'EOF'
import json, sys
out = sys.argv[1]
stages = ("train_cam", "mine_relations", "train_irn", "label", "panels")
runs = {w: json.load(open(f"{out}/{w}/report.json")) for w in ("base", "current")}
print("| run | total s | " + " | ".join(f"{s} s" for s in stages) + " | label images/s | CAM mIoU | pseudo mIoU | AP50 | AP70 |")
print("|" + " --- |" * (len(stages) + 7))
for w, r in runs.items():
    t = r["timings"]
    print(f"| {w} | {r['seconds']:.0f} | " + " | ".join(f"{t[s]:.0f}" for s in stages)
          + f" | {r['label_images_per_second']:.2f} | {r['cam_miou']:.1f} | {r['pseudo_miou']:.1f} | {r['ap50']:.1f} | {r['ap70']:.1f} |")
b, c = runs["base"], runs["current"]
print("current / base time: total %.2f, " % (c["seconds"] / b["seconds"])
      + ", ".join(f"{s} {c['timings'][s] / b['timings'][s]:.2f}" for s in stages))
EOF
