"""The zoo: does AGD(model) take every model of timm and transformers, with no override, and train it?

    PYTHONPATH=. python benchmarks/zoo.py [--only REGEX] [--steps N] [--no-momentum] [--real]
                                          [--out docs/zoo.md] [--json runs/zoo.json]

For every model of benchmarks/zoo_models.py (random init, no weights downloaded): init_weights_ +
AGD(model, direction="frobenius") (the paper's rule, the default when this page was made), N steps on one fixed batch of 8; AGD with momentum=0.9 the same; AdamW
(lr 1e-3, weight decay 0.01) on the model's own init beside them. A torch_agd.UsageError from
init_weights_ or AGD(...) is a refusal (its one-line message is the reason); any other exception
is a crash (type and message). Results are cached per model in the JSON, so `--only REGEX`
refreshes some rows and the page is rewritten from every cached row. --real adds a short run on
real data (Fashion-MNIST for a few image models, the stdlib's text for the causal LMs).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import re
import shlex
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import zoo_models  # noqa: E402

from torch_agd import AGD, UsageError, init_weights_  # noqa: E402
from torch_agd.atomic import atomic_write_text  # noqa: E402
from torch_agd.optim.rules import module_param_groups  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ADAMW = dict(lr=1e-3, weight_decay=0.01)
MOMENTUM = 0.9


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def train(model, batch, loss_fn, opt, steps: int) -> tuple[list[float], float]:
    """`steps` steps on one batch: (the loss before each step, the loss after the last)."""
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_fn(model, batch).item()
    return losses, final


def kinds_of(model) -> dict[str, int]:
    counts = Counter()
    for group in module_param_groups(model):  # a kind has one group per conv_groups: add them up
        counts[group["kind"]] += len(group["params"])
    return dict(counts)


def run_agd(model, twin, batch, loss_fn, steps: int, row: dict) -> None:
    """init_weights_ + AGD(model) (a UsageError escapes: a refusal), then training; `twin`, a copy
    of the model as built, trains with momentum 0.9 if given."""
    row["kinds"] = kinds_of(model)
    init_weights_(model, generator=torch.Generator().manual_seed(0))
    opt = AGD(model, direction="frobenius")  # the paper's rule: what docs/zoo.md measured
    row["depth"] = opt.depth
    t = time.perf_counter()
    losses, final = train(model, batch, loss_fn, opt, steps)
    row["agd"] = {"initial": losses[0], "final": final, "losses": losses, "seconds": time.perf_counter() - t}
    if twin is not None:
        init_weights_(twin, generator=torch.Generator().manual_seed(0))
        losses, final = train(twin, batch, loss_fn, AGD(twin, momentum=MOMENTUM, direction="frobenius"), steps)
        row["agd_momentum"] = {"initial": losses[0], "final": final, "losses": losses}
    agd = row["agd"]
    row["finite"] = all(math.isfinite(v) for v in agd["losses"] + [agd["final"]])
    row["falling"] = row["finite"] and agd["final"] < agd["initial"]


def run_entry(entry, steps: int, momentum: bool) -> dict:
    """One row of the zoo: never raises (a crash is recorded)."""
    row = {"name": entry.name, "library": entry.library, "steps": steps, "status": "crashed"}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model, batch, loss_fn = entry.build()
        row["params"] = sum(p.numel() for p in model.parameters())
        own = copy.deepcopy(model)  # the model's own init, for AdamW
        twin = copy.deepcopy(model) if momentum else None
        spare = copy.deepcopy(model) if entry.override else None  # as built, for the override
        try:
            run_agd(model, twin, batch, loss_fn, steps, row)
            row["status"] = "accepted"
        except UsageError as e:
            row.update(status="refused", reason=one_line(e))
            if entry.override is None:
                return row
            # the same run again with the user's override: does AGD then train it?
            text, apply = entry.override
            row["override"] = text
            undo = apply()
            try:
                run_agd(spare, copy.deepcopy(spare) if momentum else None, batch, loss_fn, steps, row)
            finally:
                undo()
        t = time.perf_counter()
        losses, final = train(own, batch, loss_fn, torch.optim.AdamW(own.parameters(), **ADAMW), steps)
        row["adamw"] = {"initial": losses[0], "final": final, "losses": losses,
                        "seconds": time.perf_counter() - t}
    except Exception as e:  # a crash is a row of the zoo, not the end of the run
        row.update(status="crashed", reason=f"{type(e).__name__}: {one_line(e)}")
    finally:
        row["seconds"] = time.perf_counter() - start
    return row


# ---------------------------------------------------------------- real data

def real_rows(entries, steps: int, data_dir: str | None) -> dict[str, dict]:
    """AGD and AdamW for `steps` steps of batch 32 on real data; loss on held-out data."""
    out = {}
    fashion = None
    for entry in entries:
        if entry.real is None:
            continue
        row = {"data": entry.real, "steps": steps}
        try:
            if entry.real == "fashion-mnist":
                if fashion is None:
                    fashion = _fashion(data_dir)
                build, batches, held_out, loss_fn = _fashion_task(entry, fashion, steps)
            else:
                build, batches, held_out, loss_fn = _text_task(entry, steps)
            for label, make_opt, agd_init in (("agd", AGD, True),
                                              ("adamw", lambda m: torch.optim.AdamW(m.parameters(), **ADAMW), False)):
                torch.manual_seed(0)
                model = build()
                if agd_init:
                    init_weights_(model, generator=torch.Generator().manual_seed(0))
                opt = make_opt(model)
                model.train()
                for batch in batches:
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model, batch).backward()
                    opt.step()
                model.eval()
                with torch.no_grad():
                    row[label] = loss_fn(model, held_out).item()
        except UsageError as e:
            row["skipped"] = one_line(e)
        except Exception as e:
            row["skipped"] = f"{type(e).__name__}: {one_line(e)}"
        out[entry.name] = row
        print(f"  real {entry.name}: {row}", flush=True)
    return out


def _fashion(data_dir):
    from torch_agd.data import load_data

    # download=False: the zoo never fetches anything; a missing copy skips the column
    return load_data("fashion-mnist", data_dir, "cpu", download=False)


def _fashion_task(entry, data, steps):
    import timm
    import torch.nn.functional as F

    def batches_of(split, n, count, seed):
        it = split.batches(n, epoch=0, seed=seed)
        return [{"x": F.interpolate(x, size=32), "y": y} for x, y in (next(it) for _ in range(count))]

    train = batches_of(data.train, 32, steps, seed=0)
    x, y = next(data.test.batches(512, epoch=0, seed=0))
    held_out = {"x": F.interpolate(x, size=32), "y": y}
    # one channel at 32 x 32; a ViT gets 4 x 4 patches (8 x 8 of them)
    extra = dict(img_size=32, patch_size=4) if "vit" in entry.name else {}
    build = lambda: timm.create_model(entry.name, pretrained=False, num_classes=10, in_chans=1, **extra)
    return build, train, held_out, zoo_models.classify


def _text_task(entry, steps):
    from torch_agd.data import load_data

    data = load_data("stdlib")
    context = 64

    def windows(split, count, seed):
        tokens = split.tokens
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(tokens) - context, (count,), generator=g)
        return torch.stack([tokens[s:s + context] for s in starts.tolist()]).long()

    train = [{"input_ids": windows(data.train, 32, seed)} for seed in range(steps)]
    held_out = {"input_ids": windows(data.test, 128, 10_000)}
    model, _, loss_fn = entry.build()
    return lambda: copy.deepcopy(model), train, held_out, loss_fn


# ---------------------------------------------------------------- the page

def fmt(v, digits=3):
    if v is None:
        return "—"
    return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"  # a diverged loss stays readable


def table(rows: list[dict], momentum: bool, real: dict) -> list[str]:
    head = ["model", "status", "L", "tensors per kind", "AGD initial", "AGD final"]
    if momentum:
        head.append("AGD m=0.9 final")
    head += ["AdamW initial", "AdamW final", "finite", "falling", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kinds = ", ".join(f"{k} {n}" for k, n in r.get("kinds", {}).items())
        status = "accepted"
        if r["status"] != "accepted":
            status = f"**{r['status']}**: {r.get('reason', '')}"
            if "override" in r:
                status += f"<br>override (the numbers are with it): `{r['override']}`"
            status = status.replace("|", "\\|")
        if "agd" not in r or "adamw" not in r:  # refused with no override, or crashed
            cells = [r["name"], status, "", kinds] + [""] * (len(head) - 5) + [fmt(r.get("seconds"), 1)]
        else:
            a, w = r["agd"], r["adamw"]
            cells = [r["name"], status, str(r["depth"]), kinds, fmt(a["initial"]), fmt(a["final"])]
            if momentum:
                cells.append(fmt(r.get("agd_momentum", {}).get("final")))
            cells += [fmt(w["initial"]), fmt(w["final"]), "yes" if r["finite"] else "**no**",
                      "yes" if r["falling"] else "**no**", fmt(r["seconds"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(rows: list[dict]) -> str:
    n = Counter(r["status"] for r in rows)
    acc = [r for r in rows if r["status"] == "accepted"]
    fixed = [r for r in rows if r["status"] == "refused" and "agd" in r]
    text = (f"{len(rows)} models: {n['accepted']} accepted with no override, {n['refused']} refused, "
            f"{n['crashed']} crashed; of the accepted, {sum(r['finite'] for r in acc)} finite and "
            f"{sum(r['falling'] for r in acc)} with the loss falling over the run")
    if fixed:
        text += (f"; of the refused, {len(fixed)} trained with an override, "
                 f"{sum(r['finite'] and r['falling'] for r in fixed)} of them finite and falling")
    return text + "."


BEHIND = 0.5  # nats: AGD's final loss this far above AdamW's is "far behind" on the page


def _finite_falling(run: dict) -> bool:
    values = run["losses"] + [run["final"]]
    return all(math.isfinite(v) for v in values) and run["final"] < run["initial"]


def standouts(rows: list[dict]) -> list[str]:
    """The rows a reader should look at: not finite, not falling, AGD far behind AdamW, slowest."""
    trained = [r for r in rows if "agd" in r and "adamw" in r]
    lines = []
    for label, key, picked in (
            ("AGD's loss not finite", "agd", [r for r in trained if not r["finite"]]),
            ("AGD's loss not falling", "agd", [r for r in trained if r["finite"] and not r["falling"]]),
            (f"AGD momentum={MOMENTUM}'s loss not finite or not falling", "agd_momentum",
             [r for r in trained if "agd_momentum" in r and not _finite_falling(r["agd_momentum"])]),
            (f"AGD's final loss more than {BEHIND} above AdamW's", "agd",
             [r for r in trained if r["finite"] and r["agd"]["final"] > r["adamw"]["final"] + BEHIND]),
            ("crashed", None, [r for r in rows if r["status"] == "crashed"])):
        names = ", ".join(f"{r['name']} ({fmt(r[key]['final'])} vs {fmt(r['adamw']['final'])})"
                          if key else r["name"] for r in picked)
        lines.append(f"- {label}: {len(picked)}" + (f": {names}" if picked else ""))
    slow = sorted((r for r in rows if "seconds" in r), key=lambda r: -r["seconds"])[:5]
    lines.append("- slowest rows: " + ", ".join(f"{r['name']} ({r['seconds']:.0f} s)" for r in slow))
    return lines


def page(rows: list[dict], real: dict, commands: list[str]) -> str:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    momentum = any("agd_momentum" in r for r in rows)
    steps = sorted({r["steps"] for r in rows})
    out = ["# The model zoo", "",
           f"Generated by `benchmarks/zoo.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
           f"(torch {torch.__version__}, timm {version('timm')}, transformers {version('transformers')}, "
           f"Python {platform.python_version()}, CPU, one thread) from the rows these runs cached in its JSON "
           f"(a later run's row replaces an earlier one's):", ""]
    out += [f"- `{c}`" for c in commands] or ["- (no run recorded its command)"]
    out += ["",
           f"**{summary(rows)}**", "",
           f"Every model is built from code with random weights (timm `pretrained=False`, transformers "
           f"from a config shrunk to width 64, 2 layers, 4 heads, a 256-token vocabulary; no dropout). "
           f"AGD: `init_weights_(model)` then `AGD(model)` with no override, {'/'.join(map(str, steps))} "
           f"steps on one fixed batch of {zoo_models.BATCH} (images {zoo_models.IMAGE} x {zoo_models.IMAGE} "
           f"unless the model's own size is smaller; token sequences of {zoo_models.SEQ}). AdamW (lr 1e-3, "
           f"weight decay 0.01) starts from the model's own initialisation, so the initial losses differ. "
           f"*initial*: the loss before the first step; *final*: after the last. *L*: `opt.depth`. "
           f"*tensors per kind*: parameter tensors per AGD rule (`module_param_groups`). "
           f"*falling*: AGD's final loss below its initial one. *s*: seconds for the whole row (every optimizer).",
           "", "Refused: `init_weights_` or `AGD(model)` raised `torch_agd.UsageError` (the reason is its "
           "message). Crashed: any other exception (type and message).", "",
           "What stands out (AGD's final loss vs AdamW's in brackets). One batch of 8 is a memorisation "
           "test: AdamW at lr 1e-3 drives most models to 0 within the run, while AGD's steps are "
           "the paper's size at its default gain 1, so a gap here measures how fast each memorises one "
           "batch; the real-data table below compares held-out losses.", ""] + standouts(rows) + [""]
    for library in ("timm", "transformers"):
        lib_rows = [r for r in rows if r["library"] == library]
        if lib_rows:
            out += [f"## {library}", "", summary(lib_rows), ""] + table(lib_rows, momentum, real) + [""]
    if real:
        # rows cached before real rows recorded their steps came from the default, 50
        real_steps = "/".join(map(str, sorted({r.get("steps", 50) for r in real.values()})))
        out += ["## Real data (--real)", "",
                f"A short run on real data: {real_steps} "
                "steps of batch 32 (a fresh batch each step), then the loss on held-out data (Fashion-MNIST: "
                "512 test images, one channel at 32 x 32; the stdlib text: 128 validation windows of 64 bytes). "
                "AGD at its defaults after `init_weights_`; AdamW as above.", "",
                "| model | data | AGD held-out loss | AdamW held-out loss |", "|---|---|---|---|"]
        for name, r in real.items():
            if "skipped" in r:
                out.append(f"| {name} | {r['data']} | skipped: {r['skipped']} | |")
            else:
                out.append(f"| {name} | {r['data']} | {fmt(r.get('agd'))} | {fmt(r.get('adamw'))} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="run only the models whose name matches this regex (others keep their cached rows)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--no-momentum", action="store_true", help="skip the AGD momentum=0.9 column")
    p.add_argument("--real", action="store_true", help="also train on real data (Fashion-MNIST, the stdlib text)")
    p.add_argument("--real-steps", type=int, default=50)
    p.add_argument("--data-dir", help="where fashion-mnist/ is (default: torch_agd's data dir or Debian's copy)")
    p.add_argument("--page-only", action="store_true", help="run nothing: rewrite the page from the JSON's rows")
    p.add_argument("--out", default=str(ROOT / "docs" / "zoo.md"))
    p.add_argument("--json", default=str(ROOT / "runs" / "zoo.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the machine is shared: one core

    entries = zoo_models.all_entries()
    chosen = [] if args.page_only else [e for e in entries if not args.only or re.search(args.only, e.name)]
    cache_path = Path(args.json)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {"rows": {}, "real": {}}
    command = shlex.join(["python", "benchmarks/zoo.py", *(sys.argv[1:] if argv is None else argv)])
    if chosen:  # the page names every command whose rows it shows
        cache.setdefault("commands", []).append(f"{command} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)")
    for i, entry in enumerate(chosen):
        row = run_entry(entry, args.steps, not args.no_momentum)
        cache["rows"][entry.name] = row
        brief = {k: row.get(k) for k in ("status", "reason", "depth", "finite", "falling")}
        if "agd" in row:
            brief["agd"] = f"{row['agd']['initial']:.3f}->{row['agd']['final']:.3f}"
            brief["adamw"] = f"{row['adamw']['initial']:.3f}->{row['adamw']['final']:.3f}"
        print(f"[{i + 1}/{len(chosen)}] {entry.name} {row['seconds']:.1f}s {brief}", flush=True)
        atomic_write_text(cache_path, json.dumps(cache, indent=1))  # every row survives a killed run
    if args.real:
        cache["real"].update(real_rows(chosen, args.real_steps, args.data_dir))
        atomic_write_text(cache_path, json.dumps(cache, indent=1))

    names = [e.name for e in entries]  # page order is the zoo's order; rows of removed models drop out
    rows = [cache["rows"][n] for n in names if n in cache["rows"]]
    real = {n: cache["real"][n] for n in names if n in cache.get("real", {})}
    atomic_write_text(args.out, page(rows, real, cache.get("commands", [])))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
