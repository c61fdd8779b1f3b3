"""The flags of `agd train` and the run's config: from the command line, or DIR/config.json
on --resume, with the one-line errors for values no run can use."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from torch_agd.data import DATASETS, TEXT
from torch_agd.data.loader import check_workers, local_batch_size
from torch_agd.errors import UsageError
from torch_agd.models import ARCHS, PAPER_ARCHS
from torch_agd.train import rundir
from torch_agd.train.fsdp import OPTIMIZERS as SHARDABLE
from torch_agd.train.loop import LOSSES
from torch_agd.train.optimizers import DEFAULT_LR, OPTIMIZERS, agd_depth

# dest: (type, default, help). Defaults are applied after parsing (argparse sees None), so
# that --resume can tell the flags a user typed from the ones left at their defaults.
FLAGS: dict[str, tuple] = {
    "arch": (str, "fcn", "network: " + ", ".join(ARCHS)),
    "dataset": (str, "cifar10", "dataset: " + ", ".join(DATASETS)),
    "loss": (str, None, "mse (the paper's square loss; the default for images) or xent (cross-entropy; "
                        "the default for text)"),
    "optimizer": (str, "agd", "agd, the baselines adam, adamw and sgd, agd+adamw (AGD on the weight matrices, "
                              "AdamW on the rest), or a peer: " + ", ".join(OPTIMIZERS[5:])),
    "lr": (float, None, "learning rate of a baseline or peer (adam and adamw 1e-3, sgd 0.1, peers their own); "
                        "not for agd"),
    "gain": (float, 1.0, "AGD's gain, its only knob (the paper suggests trying 10)"),
    "agd_depth": (str, None, "AGD's depth L: auto (layers in series along the residual path), weights (one per "
                             "weight tensor, the paper's count) or a number; default weights for the paper's "
                             "networks (fcn, vgg, resnet18, resnet50), auto for the others"),
    "momentum": (float, 0.0, "AGD's momentum (0: the paper's rule)"),
    "momentum_form": (str, "nesterov", "how AGD uses its momentum: nesterov or heavy-ball"),
    "train_bs": (int, 128, "global training batch size, split over processes"),
    "test_bs": (int, 128, "global evaluation batch size"),
    "epochs": (int, 200, "epochs to train"),
    "steps": (int, None, "train for this many optimizer steps instead of --epochs (evaluation and checkpoints "
                         "still come at the end of every epoch, and after the last step)"),
    "depth": (int, 10, "number of layers of the fcn (other networks ignore it)"),
    "width": (int, 256, "hidden width of the fcn (other networks ignore it)"),
    "seed": (int, 0, "seed of the initial weights and of each epoch's data order and augmentation"),
    "amp": (bool, False, "bf16 autocast for activations; weights stay float32"),
    "compile": (bool, False, "torch.compile the model"),
    "cpu": (bool, False, "train on the CPU even if a GPU is available"),
    "distribute": (bool, False, "one process per device under torchrun (implied by torchrun)"),
    "fsdp": (bool, False, "shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP"),
    "data_dir": (str, None, "where datasets live or are downloaded to (default $AGD_DATA, else ~/.cache/torch-agd)"),
    "workers": (int, 4, "data-loading processes (imagenet only)"),
    "out": (str, None, "run directory (default runs/<arch>-<dataset>-<time>)"),
}
CHOICES = {"arch": ARCHS, "dataset": tuple(DATASETS), "loss": tuple(LOSSES), "optimizer": OPTIMIZERS,
           "momentum_form": ("nesterov", "heavy-ball")}
# Where to find things and how fast to go: free to change on --resume. Every other flag
# defines the run and must match DIR/config.json.
SAVED_BEFORE = {"loss": "mse", "agd_depth": "weights", "momentum_form": "nesterov"}
MAY_CHANGE_ON_RESUME = ("data_dir", "workers", "distribute", "compile", "out")
TIMING_KEYS = ("epoch_seconds", "train_samples_per_second")


def _flag(dest: str) -> str:
    # The published spellings keep their underscore (--train_bs); the new flags use dashes.
    return "--" + (dest if dest in ("train_bs", "test_bs") else dest.replace("_", "-"))


_METAVARS = {"data_dir": "DIR", "out": "DIR", "agd_depth": "L"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for dest, (kind, default, text) in FLAGS.items():
        names = {_flag(dest), "--" + dest, "--" + dest.replace("_", "-")}  # both spellings work
        names = sorted(names, key=lambda n: n != _flag(dest))
        shown = "" if default is None or kind is bool else f" (default {default})"
        if kind is bool:
            parser.add_argument(*names, dest=dest, action="store_true", default=None, help=text)
        else:
            parser.add_argument(*names, dest=dest, type=kind, default=None, choices=CHOICES.get(dest),
                                metavar=None if dest in CHOICES else _METAVARS.get(dest, {int: "N", float: "X"}.get(kind)),
                                help=text + shown)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out DIR from its last checkpoint, with DIR/config.json")


# ------------------------------------------------------------------------ configuration


def _given(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}


def _check_new(config: dict, given: dict) -> None:
    """One-line errors for values no run can use; raised before anything is loaded. Batch sizes
    are checked by check_split; --lr with agd and out-of-range values of --lr/--gain are refused
    by build_optimizer; each rule has one owner, the code that uses the value."""
    if config["epochs"] < 1:
        raise UsageError(f"{_flag('epochs')} must be at least 1, got {config['epochs']}")
    if config["steps"] is not None and config["steps"] < 1:
        raise UsageError(f"--steps must be at least 1, got {config['steps']}")
    if "steps" in given and "epochs" in given:
        raise UsageError("give --epochs or --steps, not both")
    check_workers(config["workers"])
    agd = config["optimizer"] in ("agd", "agd+adamw")
    for flag in ("gain", "agd_depth", "momentum"):
        if flag in given and not agd:
            raise UsageError(f"{_flag(flag)} only applies to --optimizer agd; {config['optimizer']} takes --lr")
    for flag in ("momentum", "momentum_form"):
        if flag in given and config["optimizer"] != "agd":
            raise UsageError(f"{_flag(flag)} only applies to --optimizer agd")
    agd_depth(config["agd_depth"])
    if config["dataset"] == "text" and config["data_dir"] is None:
        raise UsageError("--dataset text needs --data-dir FILE (a UTF-8 text file) or a directory of text files")


def resolve_config(args: argparse.Namespace) -> tuple[dict, bool]:
    """The run's full config (every flag) and whether it continues an existing run directory."""
    given = _given(args)
    if args.resume:
        if "out" not in given:
            raise UsageError("--resume needs --out DIR, the run directory to continue")
        path = Path(given["out"]) / rundir.CONFIG
        if not path.is_file():
            raise UsageError(f"nothing to resume: {path} does not exist (start the run without --resume)")
        saved = json.loads(path.read_text())
        # A run saved before a flag existed ran as that flag's default does.
        config = {k: saved.get(k, SAVED_BEFORE.get(k, FLAGS[k][1])) for k in FLAGS}
        differ = [f"{_flag(k)} {v} (the run has {config[k]})" for k, v in given.items()
                  if k not in MAY_CHANGE_ON_RESUME and config[k] != v]
        if differ:
            raise UsageError(f"--resume: flags differ from {path}: {', '.join(differ)}; "
                             "drop them to continue the run as it was started")
        config.update({k: given[k] for k in MAY_CHANGE_ON_RESUME if k in given})
        return config, True
    config = {k: given.get(k, default) for k, (_, default, _) in FLAGS.items()}
    if config["lr"] is None:
        config["lr"] = DEFAULT_LR.get(config["optimizer"])
    if config["loss"] is None:
        config["loss"] = "xent" if config["dataset"] in TEXT else "mse"
    if config["agd_depth"] is None:
        config["agd_depth"] = "weights" if config["arch"] in PAPER_ARCHS else "auto"
    _check_new(config, given)
    return config, False


def default_out(config: dict) -> str:
    stem = Path("runs") / f"{config['arch']}-{config['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = stem, 1
    while out.exists():  # two runs started in the same second
        n += 1
        out = stem.with_name(f"{stem.name}-{n}")
    return str(out)


def check_fsdp(config: dict) -> None:
    """What --fsdp does not combine with (checked before joining the process group)."""
    if not config["fsdp"]:
        return
    if config["compile"]:
        raise UsageError("--fsdp does not combine with --compile yet; drop --compile")
    if config["optimizer"] not in SHARDABLE:
        raise UsageError(f"--fsdp trains with --optimizer {', '.join(SHARDABLE[:-1])} or {SHARDABLE[-1]}; "
                         f"run --optimizer {config['optimizer']} without --fsdp")


def check_split(config: dict, world_size: int) -> None:
    """The batch sizes: at least 1, and each rank takes an equal slice of every global batch
    (the data loader's rules, checked before joining the process group)."""
    for dest in ("train_bs", "test_bs"):
        local_batch_size(config[dest], world_size, name=_flag(dest))
