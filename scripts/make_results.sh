#!/usr/bin/env bash
# Regenerate docs/results.md and docs/figures/*.png from scratch-or-resume sweeps.
#
#   scripts/make_results.sh            # all four small-scale sweeps, 3 seeds, into runs/
#   SEEDS=5 JOBS=2 scripts/make_results.sh
#
# Each sweep skips runs that already finished, so an interrupted call picks up where it
# stopped. On a 2-core CPU the four sweeps take about 20 CPU-minutes (105 runs).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
ROOT=${ROOT:-runs}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-1}
SCALE=${SCALE:-small}

for grid in lr shape batch peers; do
    "$PYTHON" -m torch_agd sweep "$grid" --scale "$SCALE" --seeds "$SEEDS" --jobs "$JOBS" --root "$ROOT"
done
"$PYTHON" -m torch_agd.experiments.results "$ROOT" --out docs/results.md --figures docs/figures
