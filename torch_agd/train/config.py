"""The flags of `agd train` and the run's config: one frozen TrainConfig, from the command line
or from DIR/config.json on --resume, with the one-line errors for values no run can use.

A flag's default lives in FLAGS; the defaults that depend on other flags (--loss, --agd-depth,
--lr) are resolved once, in resolve_config. The run reads the TrainConfig's typed fields; its
config.json keeps the flags' names and values (to_json / from_flags), which is what sweeps, the
results page and resumes of older run directories read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from torch_agd.data import DATASETS, TEXT
from torch_agd.data.loader import check_workers, local_batch_size
from torch_agd.errors import UsageError
from torch_agd.models import ARCHS, PAPER_ARCHS, check_arch
from torch_agd.models.libraries import HF_DEPTH, HF_WIDTH
from torch_agd.optim.orthogonalize import DIRECTIONS
from torch_agd.train import rundir
from torch_agd.train.fsdp import SHARDABLE, UNSHARDABLE_PEERS
from torch_agd.train.loop import LOSSES
from torch_agd.train.muon import ADJUST_LR, DEFAULT_MUON_LR, NS_DTYPES
from torch_agd.train.optimizers import AGD_HEADS, AGD_OPTIMIZERS, DEFAULT_LR, OPTIMIZERS, PEERS, default_lr, parse_agd_depth
from torch_agd.train.schedule import SCHEDULES

MOMENTUM_FORMS = ("nesterov", "heavy-ball")  # --momentum-form; TrainConfig.nesterov means the first

# dest: (type, default, help). Defaults are applied after parsing (argparse sees None), so
# that --resume can tell the flags a user typed from the ones left at their defaults.
FLAGS: dict[str, tuple] = {
    "arch": (str, "fcn", "network: " + ", ".join(ARCHS) + ", timm:NAME (any timm model) or hf:NAME (a transformers "
                          "causal LM by model type: hf:llama, hf:gpt2, hf:mixtral...), random init"),
    "dataset": (str, "cifar10", "dataset: " + ", ".join(DATASETS)),
    "loss": (str, None, "mse (the paper's square loss; the default for images) or xent (cross-entropy; "
                        "the default for text)"),
    "optimizer": (str, "agd", "agd, the baselines adam, adamw and sgd, agd+adamw (AGD on the weight matrices, "
                              "AdamW on the rest), muon (torch.optim.Muon on the hidden weight matrices, AdamW on "
                              "the rest), or a peer: " + ", ".join(PEERS)),
    "lr": (float, None, "learning rate of a baseline or peer (" + ", ".join(f"{name} {lr:g}" for name, lr in
                        DEFAULT_LR.items()) + ", muon " + ", ".join(f"{lr:g} at {how}" for how, lr in
                        DEFAULT_MUON_LR.items()) + ", peers their own); not for agd"),
    "aux_lr": (float, None, f"learning rate of muon's AdamW part (embeddings, output head, biases, norms; default "
                            f"{DEFAULT_LR['adamw']:g})"),
    "muon_adjust_lr": (str, None, "muon's lr adjustment per matrix shape (torch's adjust_lr_fn): original "
                                  "(Keller Jordan's, torch's default) or match_rms_adamw (Moonshot's: AdamW's update RMS)"),
    "muon_ns_dtype": (str, None, "precision of muon's Newton-Schulz iteration: bfloat16 (torch's, the default) or "
                                 "float32 (the same iteration, several times faster on a CPU without bfloat16 units)"),
    "schedule": (str, "none", "lr multiplier over the run's steps, for every optimizer alike: none, linear or "
                              "cosine (decay to zero at the last step)"),
    "warmup": (int, 0, "steps of linear warmup of the lr multiplier before the schedule"),
    "gain": (float, 1.0, "AGD's gain, its only knob (the paper suggests trying 10)"),
    "agd_depth": (str, None, "AGD's depth L: auto (layers in series along the residual path), weights (one per "
                             "weight tensor, the paper's count) or a number; default weights for the paper's "
                             "networks (fcn, vgg, resnet18, resnet50), auto for the others"),
    "momentum": (float, 0.0, "AGD's momentum (0: the paper's rule)"),
    "momentum_form": (str, "nesterov", "how AGD uses its momentum: nesterov or heavy-ball"),
    "agd_direction": (str, "frobenius", "how AGD moves each matrix block: frobenius (the paper's g / ||g||_F) or "
                                        "orthogonal (g's orthogonalisation, U V^T by Newton-Schulz; docs/rules.md)"),
    "agd_head": (str, "same", "under --agd-direction orthogonal: same (the output head moves like every matrix) or "
                              "frobenius (the head keeps the paper's rule, as Muon leaves the head to AdamW)"),
    "train_bs": (int, 128, "global training batch size, split over processes"),
    "test_bs": (int, 128, "global evaluation batch size"),
    "epochs": (int, 200, "epochs to train"),
    "steps": (int, None, "train for this many optimizer steps instead of --epochs (evaluation and checkpoints "
                         "still come at the end of every epoch, and after the last step)"),
    "depth": (int, 10, f"number of layers of the fcn, or of an hf: model (default {HF_DEPTH} there); other networks "
                       "ignore it"),
    "width": (int, 256, f"hidden width of the fcn, or of an hf: model (default {HF_WIDTH} there); other networks "
                        "ignore it"),
    "seed": (int, 0, "seed of the initial weights and of each epoch's data order and augmentation"),
    "amp": (bool, False, "bf16 autocast for activations; weights stay float32"),
    "compile": (bool, False, "torch.compile the model"),
    "cpu": (bool, False, "train on the CPU even if a GPU is available"),
    "distribute": (bool, False, "one process per device under torchrun (implied by torchrun)"),
    "fsdp": (bool, False, "shard weights, gradients and optimizer state over the processes (FSDP2) instead of DDP"),
    "tp": (int, 1, "tensor parallelism: split each transformer layer over N processes (Megatron's column/row "
                   "pairs; charlm and hf: models), FSDP2 over the world / N data-parallel groups; needs --fsdp"),
    "data_dir": (str, None, "where datasets live or are downloaded to (default $AGD_DATA, else ~/.cache/torch-agd)"),
    "workers": (int, 4, "data-loading processes (imagenet only)"),
    "out": (str, None, "run directory (default runs/<arch>-<dataset>-<time>)"),
}
CHOICES = {"dataset": tuple(DATASETS), "loss": tuple(LOSSES), "optimizer": OPTIMIZERS,
           "momentum_form": MOMENTUM_FORMS, "agd_direction": DIRECTIONS, "agd_head": AGD_HEADS, "muon_adjust_lr": ADJUST_LR,
           "muon_ns_dtype": NS_DTYPES, "schedule": SCHEDULES}
# Where to find things and how fast to go: free to change on --resume. Every other flag
# defines the run and must match DIR/config.json.
SAVED_BEFORE = {"loss": "mse", "agd_depth": "weights", "momentum_form": "nesterov"}
MAY_CHANGE_ON_RESUME = ("data_dir", "workers", "distribute", "compile", "out", "tp")  # tp: DCP reshards
# config.json's "config_format", for values whose meaning changed: 2 since agd+adamw honours
# --agd-depth (format 1, a config.json without the key, had it count one layer per matrix
# whatever agd_depth said).
CONFIG_FORMAT = 2
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

@dataclass(frozen=True)
class TrainConfig:
    """One run, every flag resolved. ``depth`` is the FCN's (--depth) and nothing else's;
    ``agd_depth`` is AGD's L as given (auto, weights or a number); ``nesterov`` is
    --momentum-form nesterov (False: heavy-ball); ``lr`` is None for AGD and for a peer at its
    package's own default; ``aux_lr``, ``muon_adjust_lr`` and ``muon_ns_dtype`` are Muon's (None for the others);
    ``schedule`` and ``warmup`` shape every optimizer's lr over the run (schedule.py)."""

    arch: str
    dataset: str
    loss: str
    optimizer: str
    lr: float | None
    aux_lr: float | None
    muon_adjust_lr: str | None
    muon_ns_dtype: str | None
    schedule: str
    warmup: int
    gain: float
    agd_depth: str
    momentum: float
    nesterov: bool
    agd_direction: str
    agd_head: str
    train_bs: int
    test_bs: int
    epochs: int
    steps: int | None
    depth: int
    width: int
    seed: int
    amp: bool
    compile: bool
    cpu: bool
    distribute: bool
    fsdp: bool
    data_dir: str | None
    workers: int
    out: str | None
    tp: int = 1

    @classmethod
    def from_flags(cls, values: dict) -> "TrainConfig":
        """From every flag's value, by its dest (config.json holds them so)."""
        form = values["momentum_form"]
        if form not in MOMENTUM_FORMS:  # argparse refuses others; a hand-edited config.json may not
            raise UsageError(f"{_flag('momentum_form')} must be nesterov or heavy-ball, got {form!r}")
        fields = {k: v for k, v in values.items() if k != "momentum_form"}
        return cls(**fields, nesterov=form == "nesterov")

    def flag_values(self) -> dict:
        """Every flag's value, by its dest, in FLAGS' order: what config.json records."""
        fields = dataclasses.asdict(self)
        fields["momentum_form"] = MOMENTUM_FORMS[0] if self.nesterov else MOMENTUM_FORMS[1]
        return {k: fields[k] for k in FLAGS}


def _given(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}


def _check_new(values: dict, given: dict) -> None:
    """One-line errors for values no run can use; raised before anything is loaded. Batch sizes
    are checked by check_split; --lr with agd and out-of-range values of --lr/--gain are refused
    by build_optimizer; each rule has one owner, the code that uses the value."""
    check_arch(values["arch"])
    if values["epochs"] < 1:
        raise UsageError(f"{_flag('epochs')} must be at least 1, got {values['epochs']}")
    if values["steps"] is not None and values["steps"] < 1:
        raise UsageError(f"--steps must be at least 1, got {values['steps']}")
    if "steps" in given and "epochs" in given:
        raise UsageError("give --epochs or --steps, not both")
    check_workers(values["workers"])
    for flag in ("gain", "agd_depth", "momentum"):
        if flag in given and values["optimizer"] not in AGD_OPTIMIZERS:
            raise UsageError(f"{_flag(flag)} only applies to --optimizer agd; {values['optimizer']} takes --lr")
    for flag in ("momentum", "momentum_form", "agd_direction", "agd_head"):
        if flag in given and values["optimizer"] != "agd":
            raise UsageError(f"{_flag(flag)} only applies to --optimizer agd")
    for flag in ("aux_lr", "muon_adjust_lr", "muon_ns_dtype"):
        if flag in given and values["optimizer"] != "muon":
            raise UsageError(f"{_flag(flag)} only applies to --optimizer muon")
    if values["warmup"] < 0:
        raise UsageError(f"--warmup must be 0 or more steps, got {values['warmup']}")
    parse_agd_depth(values["agd_depth"])
    if values["dataset"] == "text" and values["data_dir"] is None:
        raise UsageError("--dataset text needs --data-dir FILE (a UTF-8 text file) or a directory of text files")


def _migrate(saved: dict, values: dict) -> None:
    """Give ``values`` (read from an older config.json, ``saved``) the meaning they had when that
    run started, so that it resumes as it ran."""
    if saved.get("config_format", 1) < 2 and values["optimizer"] == "agd+adamw":
        values["agd_depth"] = "weights"  # what agd+adamw used, whatever agd_depth recorded


def _resume(given: dict) -> TrainConfig:
    """The run in --out DIR as its config.json records it, with the flags that may change."""
    if "out" not in given:
        raise UsageError("--resume needs --out DIR, the run directory to continue")
    path = Path(given["out"]) / rundir.CONFIG
    if not path.is_file():
        raise UsageError(f"nothing to resume: {path} does not exist (start the run without --resume)")
    saved = json.loads(path.read_text())
    # A run saved before a flag existed ran as that flag's default does.
    values = {k: saved.get(k, SAVED_BEFORE.get(k, FLAGS[k][1])) for k in FLAGS}
    _migrate(saved, values)
    differ = [f"{_flag(k)} {v} (the run has {values[k]})" for k, v in given.items()
              if k not in MAY_CHANGE_ON_RESUME and values[k] != v]
    if differ:
        raise UsageError(f"--resume: flags differ from {path}: {', '.join(differ)}; "
                         "drop them to continue the run as it was started")
    values.update({k: given[k] for k in MAY_CHANGE_ON_RESUME if k in given})
    return TrainConfig.from_flags(values)


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, bool]:
    """The run's config and whether it continues an existing run directory."""
    given = _given(args)
    if args.resume:
        return _resume(given), True
    values = {k: given.get(k, default) for k, (_, default, _) in FLAGS.items()}
    # The defaults that depend on another flag, each resolved here and nowhere else.
    if values["optimizer"] == "muon":  # recorded, so config.json says what the run used
        values["muon_adjust_lr"] = values["muon_adjust_lr"] or ADJUST_LR[0]
        values["muon_ns_dtype"] = values["muon_ns_dtype"] or NS_DTYPES[0]
        if values["aux_lr"] is None:
            values["aux_lr"] = DEFAULT_LR["adamw"]
    if values["lr"] is None:
        values["lr"] = default_lr(values["optimizer"], values["muon_adjust_lr"])
    if values["loss"] is None:
        values["loss"] = "xent" if values["dataset"] in TEXT else "mse"
    if values["agd_depth"] is None:
        values["agd_depth"] = "weights" if values["arch"] in PAPER_ARCHS else "auto"
    if values["arch"].startswith("hf:"):  # a transformer of the size of this project's own LM
        values["depth"], values["width"] = given.get("depth", HF_DEPTH), given.get("width", HF_WIDTH)
    _check_new(values, given)
    return TrainConfig.from_flags(values), False


def default_out(config: TrainConfig) -> str:
    arch = config.arch.replace(":", "-")  # timm:resnet18 -> timm-resnet18
    stem = Path("runs") / f"{arch}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = stem, 1
    while out.exists():  # two runs started in the same second
        n += 1
        out = stem.with_name(f"{stem.name}-{n}")
    return str(out)


def check_fsdp(config: TrainConfig) -> None:
    """What --fsdp does not combine with (checked before joining the process group)."""
    if not config.fsdp:
        return
    if config.compile:
        raise UsageError("--fsdp does not combine with --compile yet; drop --compile")
    if config.optimizer in UNSHARDABLE_PEERS:
        raise UsageError(f"--fsdp cannot train with --optimizer {config.optimizer}: "
                         f"{UNSHARDABLE_PEERS[config.optimizer]}; run it without --fsdp")
    if config.optimizer not in SHARDABLE:
        raise UsageError(f"--fsdp trains with --optimizer {', '.join(SHARDABLE[:-1])} or {SHARDABLE[-1]}; "
                         f"run --optimizer {config.optimizer} without --fsdp")


def check_split(config: TrainConfig, world_size: int) -> None:
    """The batch sizes: at least 1, and each rank takes an equal slice of every global batch
    (the data loader's rules, checked before joining the process group)."""
    local_batch_size(config.train_bs, world_size, name=_flag("train_bs"))
    local_batch_size(config.test_bs, world_size, name=_flag("test_bs"))
