#!/usr/bin/env bash
# Regenerate docs/results.md and docs/figures/*.png from scratch-or-resume sweeps.
#
#   scripts/make_results.sh            # every small-scale sweep, 3 seeds, into runs/
#   SEEDS=5 JOBS=2 scripts/make_results.sh
#   GRIDS="lr batch batch-steps" scripts/make_results.sh   # some sweeps; the page shows every grid found
#
# Runs go to ROOT (checkpoints, not versioned); each finished run's record (config, metrics,
# summary) is kept in RECORDS (committed), and the page is rendered from RECORDS, so it can be
# rendered again from a fresh checkout.
#
# Each sweep skips runs that already finished, so an interrupted call picks up where it
# stopped. The four grids of the paper's figures (lr shape batch peers: 105 runs) take about 20
# CPU-minutes; batch-steps about 10 more; momentum and models take hours (docs/experiments.md
# gives estimates per grid).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
ROOT=${ROOT:-runs}
RECORDS=${RECORDS:-records}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-1}
SCALE=${SCALE:-small}
GRIDS=${GRIDS:-lr shape batch batch-steps peers momentum models libraries compare}

# compare reruns a few rows at more seeds, where 3 hid the ordering (grids.COMPARE_MORE_SEEDS)
COMPARE_SEEDS=$("$PYTHON" -c "from torch_agd.experiments.grids import COMPARE_MORE_SEEDS_UPTO as n; print(n)")
for grid in $GRIDS; do
    seeds=$SEEDS
    if [ "$grid" = compare ] && [ "$seeds" -lt "$COMPARE_SEEDS" ]; then seeds=$COMPARE_SEEDS; fi
    "$PYTHON" -m torch_agd sweep "$grid" --scale "$SCALE" --seeds "$seeds" --jobs "$JOBS" --root "$ROOT" --records "$RECORDS"
done
"$PYTHON" -m torch_agd.experiments.results "$RECORDS" --out docs/results.md --figures docs/figures
