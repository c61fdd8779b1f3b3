"""A small CPU check that the orthogonal direction trains: a CharLM (dim 64, 2 layers, context
32) on the bytes of docs/*.md (90% train, the last 10% validation), AGD with Nesterov momentum
0.9 at its defaults, one thread, for each variant and seed; prints the validation loss.

    python benchmarks/orthogonal_smoke.py [--steps 1000] [--seeds 0 1]
                                          [--variants frobenius orthogonal orthogonal-head-frobenius]

"orthogonal-head-frobenius" keeps the linear head on the Frobenius rule (docs/rules.md, "The
orthogonal direction"), with the model's own L. This is a smoke test of a few minutes, not the
issue's byte-LM experiment: the text changes whenever the docs do, so compare variants within
one run only.
"""
import argparse
import pathlib
import time

import torch
from torch import nn

from torch_agd import AGD, init_weights_
from torch_agd.models.charlm import CharLM
from torch_agd.optim.rules import module_param_groups

CONTEXT, BATCH = 32, 16


def head_on_frobenius(model: nn.Module) -> AGD:
    groups = module_param_groups(model)
    head = [(n, p) for g in groups for n, p in g["params"] if n == "head.weight"]
    for g in groups:
        g["params"] = [(n, p) for n, p in g["params"] if n != "head.weight"]
    groups = [g for g in groups if g["params"]] + [{"params": head, "kind": "weight", "direction": "frobenius"}]
    return AGD(groups, direction="orthogonal", momentum=0.9, depth=AGD(model).depth)


def batch(src: torch.Tensor, g: torch.Generator):
    i = torch.randint(0, len(src) - CONTEXT - 1, (BATCH,), generator=g)
    return torch.stack([src[j:j + CONTEXT] for j in i]), torch.stack([src[j + 1:j + CONTEXT + 1] for j in i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=["frobenius", "orthogonal", "orthogonal-head-frobenius"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    docs = pathlib.Path(__file__).resolve().parent.parent / "docs"
    data = torch.tensor(list(b"".join(p.read_bytes() for p in sorted(docs.glob("*.md")))), dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    for seed in args.seeds:
        for variant in args.variants:
            torch.manual_seed(seed)
            model = init_weights_(CharLM(256, dim=64, layers=2, heads=2, context=CONTEXT))
            opt = head_on_frobenius(model) if variant == "orthogonal-head-frobenius" else \
                AGD(model, momentum=0.9, direction=variant)
            g, t0 = torch.Generator().manual_seed(seed), time.time()
            for _ in range(args.steps):
                x, y = batch(train, g)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
                opt.step()
            gv = torch.Generator().manual_seed(10_000)
            with torch.no_grad():
                loss = sum(nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                           for x, y in (batch(val, gv) for _ in range(20))) / 20
            print(f"seed {seed} {variant}: {args.steps} steps, validation loss {loss:.3f}, last eta "
                  f"{opt.eta.item():.3f}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
