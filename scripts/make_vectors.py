"""Regenerate tests/data/agd_steps.json: each case's expected step and eta, computed by the
literal transcription of the paper (torch_agd.optim.reference) from the case's inputs.

The inputs (weights, gradients, gain, depth) are the shared vectors' own (../shared/vectors when
present, else the committed copy); only the outputs are computed here, so the file checks the
optimizer against the paper's formulas and not against itself. tests/test_package.py checks that
this reproduces the committed file to the tests' tolerance (1e-12 in float64).

    python scripts/make_vectors.py                 # rewrite tests/data/agd_steps.json
    python scripts/make_vectors.py --check         # exit 1 if it would change beyond 1e-12
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from torch_agd.atomic import atomic_write_bytes
from torch_agd.optim.reference import reference_step

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tests" / "data" / "agd_steps.json"
SHARED = ROOT.parent / "shared" / "vectors" / "agd_steps.json"
TOLERANCE = 1e-12


def regenerate(cases: list[dict]) -> list[dict]:
    """The cases with "eta" and "expected" recomputed by the reference from their inputs."""
    out = []
    for case in cases:
        weights = [torch.tensor(w, dtype=torch.float64) for w in case["weights"]]
        grads = [torch.tensor(g, dtype=torch.float64) for g in case["grads"]]
        new, eta = reference_step(weights, grads, gain=case["gain"], depth=case["depth"])
        out.append({**case, "eta": eta, "expected": [w.tolist() for w in new]})
    return out


def differences(old: list[dict], new: list[dict]) -> list[str]:
    """Where ``new`` departs from ``old`` by more than TOLERANCE (relative for eta, absolute and
    relative for the weights, as the tests compare them)."""
    found = []
    if [c["name"] for c in old] != [c["name"] for c in new]:
        return ["the cases differ"]
    for a, b in zip(old, new, strict=True):
        if not math.isclose(a["eta"], b["eta"], rel_tol=TOLERANCE):
            found.append(f"{a['name']}: eta {a['eta']!r} -> {b['eta']!r}")
        for i, (x, y) in enumerate(zip(a["expected"], b["expected"], strict=True)):
            x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
            if x.shape != y.shape or not torch.allclose(x, y, rtol=TOLERANCE, atol=TOLERANCE):
                found.append(f"{a['name']}: tensor {i} differs")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing it")
    args = parser.parse_args(argv)
    source = SHARED if SHARED.is_file() else COMMITTED
    data = json.loads(source.read_text())
    new = {**data, "cases": regenerate(data["cases"])}
    if args.check:
        found = differences(json.loads(COMMITTED.read_text())["cases"], new["cases"])
        print("\n".join(found) or f"{COMMITTED.relative_to(ROOT)}: reproduced to {TOLERANCE}")
        return 1 if found else 0
    atomic_write_bytes(COMMITTED, json.dumps(new).encode())
    print(f"wrote {COMMITTED.relative_to(ROOT)} ({len(new['cases'])} cases, inputs from {source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
