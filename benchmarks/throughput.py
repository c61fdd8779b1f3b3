"""Training throughput of `agd train`, and its wall time against the published pipeline.

    python benchmarks/throughput.py              # everything (about 5 minutes on 2 CPU cores)
    python benchmarks/throughput.py --no-job     # samples/s only
    python benchmarks/throughput.py --job-only   # the whole-job comparison only

1. Samples per second of the training step (forward, loss, backward, AGD step, batches drawn
   from the device-resident split) for the FCN 8x256 on Fashion-MNIST and, at small size, the
   PreAct-ResNet-18 on CIFAR-shaped synthetic data with crop+flip augmentation; on the CPU, and
   on the GPU when there is one.
2. The whole job `agd train --arch fcn --dataset fashion-mnist --depth 8 --width 256 --epochs 2`
   (start-up, data loading and evaluation included), each run a fresh process, beside a
   reimplementation of the published pipeline doing the same job: torchvision's FashionMNIST
   dataset read from the Debian files, a DataLoader with per-sample ToTensor + Normalize, and
   `.item()` on the loss and accuracy of every batch; same model, same AGD. Both read the
   Debian files; each side's one-time preparation is done before the timed rounds (torchvision's
   decompressed layout for the published side; for `agd train`, one untimed first run, which
   checks the files and writes the decoded cache, and whose time is printed). Then --repeats
   rounds, each running the two jobs back to back; prints both wall times (median) and the median
   of the per-round ratios (target: at most 0.33). The per-round ratio follows a shared machine's
   load better than a ratio of medians does; each job's CPU seconds are printed too, as a
   check when the machine is busy with other work.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FASHION = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parents[1]
JOB = ["--arch", "fcn", "--dataset", "fashion-mnist", "--depth", "8", "--width", "256", "--epochs", "2",
       "--train_bs", "128", "--test_bs", "128"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def samples_per_second(arch: str, split, info, device: torch.device, batch_size: int, steps: int, warmup: int) -> float:
    from torch_agd.models import build_model
    from torch_agd.train.loop import mse_loss, train_epoch
    from torch_agd.train.optimizers import build_optimizer

    torch.manual_seed(0)
    model = build_model(arch, info, depth=8, width=256)
    optimizer = build_optimizer("agd", model)
    model.to(device)

    def epoch(n: int, index: int) -> None:
        batches = split.batches(batch_size, epoch=index)
        stats = train_epoch(model, optimizer, (b for _, b in zip(range(n), batches)), loss_fn=mse_loss, device=device)
        stats["loss_sum"].item()  # one sync, as the trainer does per epoch

    epoch(warmup, 0)
    _sync(device)
    start = time.perf_counter()
    epoch(steps, 1)
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def throughput(devices: list[torch.device]) -> None:
    from torch_agd.data import DATASETS, load_data
    from torch_agd.data.loader import TensorSplit

    print("training samples/s (forward + backward + AGD step, batches from the device-resident split)")
    for device in devices:
        fashion = load_data("fashion-mnist", None, device)  # $AGD_DATA, set by main()
        rate = samples_per_second("fcn", fashion.train, fashion.info, device, 128, steps=200, warmup=20)
        print(f"  {device.type:4s} fcn 8x256 fashion-mnist, batch 128:         {rate:12,.0f}")

        info = DATASETS["cifar10"]
        g = torch.Generator().manual_seed(0)
        n, batch, steps = (512, 16, 4) if device.type == "cpu" else (8192, 256, 50)
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g)
        split = TensorSplit(images, labels, info.mean, info.std, train=True, augment=True, device=device)
        rate = samples_per_second("resnet18", split, info, device, batch, steps=steps, warmup=2)
        print(f"  {device.type:4s} resnet18 cifar-shaped synthetic, batch {batch}:  {rate:12,.0f}")


# ---------------------------------------------------------------- the published pipeline


def published_job(root: str, device: str) -> None:
    """The published main.py's job, rewritten here (not copied): DataLoader, per-sample
    transforms, a host sync per step. Runs in its own process, like `agd train`."""
    import math

    from torchvision import datasets, transforms

    from torch_agd import AGD, init_weights_
    from torch_agd.data import DATASETS
    from torch_agd.models import build_model

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    trainset = datasets.FashionMNIST(root, train=True, download=False, transform=transform)
    testset = datasets.FashionMNIST(root, train=False, download=False, transform=transform)
    train_loader = torch.utils.data.DataLoader(trainset, batch_size=128, shuffle=True, pin_memory=device == "cuda")
    test_loader = torch.utils.data.DataLoader(testset, batch_size=128, shuffle=False, pin_memory=device == "cuda")
    net = build_model("fcn", DATASETS["fashion-mnist"], depth=8, width=256).to(device)
    init_weights_(net)
    optim = AGD(net, direction="frobenius")  # the paper's rule, as `make train` runs it

    def loop(loader, train: bool):
        net.train() if train else net.eval()
        total_loss = total_acc = 0.0
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            output = net(data)
            onehot = torch.nn.functional.one_hot(target, num_classes=output.shape[1]).float() * math.sqrt(output.shape[1])
            loss = (output - onehot).square().mean()
            if train:
                loss.backward()
                optim.step()
                net.zero_grad()
            acc = (output.argmax(dim=1) == target).float().mean()
            total_loss += loss.item()
            total_acc += acc.item()
        return total_loss / len(loader), total_acc / len(loader)

    for epoch in range(2):
        train_loss, train_acc = loop(train_loader, True)
        test_loss, test_acc = loop(test_loader, False)
        print(f"epoch {epoch + 1}: train loss {train_loss:.4f} test acc {test_acc:.4f}", flush=True)


def _torchvision_root() -> str:
    """torchvision's FashionMNIST layout (ROOT/FashionMNIST/raw/<name>, decompressed), built once
    from the Debian files, outside the timed region."""
    root = Path(tempfile.gettempdir()) / "torch-agd-bench-torchvision"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in FASHION.glob("*-ubyte.gz"):
        target = raw / gz.name[:-3]
        if not target.exists():
            with gzip.open(gz) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return str(root)


def _timed(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds (user + system), stdout) of one run of ``argv`` in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, result.stdout


def whole_job(repeats: int, device: str) -> None:
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        print(f"whole job: skipped, {FASHION} is missing (apt-get install dataset-fashion-mnist)")
        return
    root = _torchvision_root()
    ours, published, cpu_ours, cpu_published = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        flags = [] if device == "cuda" else ["--cpu"]
        # The default data dir (no --data-dir), as `make train` runs it: Debian's copy serves,
        # the decoded cache goes to this fresh $AGD_DATA.
        env = {**os.environ, "AGD_DATA": f"{tmp}/data"}

        def agd_train(out: str) -> tuple[float, float, str]:
            return _timed(["-m", "torch_agd", "train", *JOB, *flags, "--out", f"{tmp}/{out}"], env)

        first, _, _ = agd_train("first")
        for i in range(repeats):  # each round runs both, so both see the same machine load
            seconds, cpu, _ = _timed([__file__, "--published-job", root, "--device", device])
            published.append(seconds)
            cpu_published.append(cpu)
            seconds, cpu, stdout = agd_train(f"run{i}")
            ours.append(seconds)
            cpu_ours.append(cpu)
        data_line = next((line for line in stdout.splitlines() if line.startswith("data: ")), "(no data line)")
    a, b = statistics.median(ours), statistics.median(published)
    ratio = statistics.median(o / p for o, p in zip(ours, published))
    print(f"whole job on {device}, fcn 8x256 fashion-mnist, 2 epochs with evaluation, start-up included "
          f"(median of {repeats} rounds, torch threads {torch.get_num_threads()}):")
    print(f"  published pipeline: {b:6.1f} s   ({', '.join(f'{t:.1f}' for t in published)})")
    print(f"  agd train:          {a:6.1f} s   ({', '.join(f'{t:.1f}' for t in ours)}); its first run "
          f"{first:.1f} s, checking the files and writing the decoded cache")
    print(f"  agd train's {data_line}")
    print(f"  ratio agd train / published (median of the rounds' ratios: "
          f"{', '.join(f'{o / p:.2f}' for o, p in zip(ours, published))}): {ratio:.2f}  (target <= 0.33)")
    # On a machine shared with other work, wall times stretch with its load; CPU time much less.
    print(f"  CPU seconds (user + system), for a shared machine: published "
          f"{', '.join(f'{t:.1f}' for t in cpu_published)}; agd train {', '.join(f'{t:.1f}' for t in cpu_ours)}; "
          f"ratio {statistics.median(o / p for o, p in zip(cpu_ours, cpu_published)):.2f}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the whole-job comparison (median reported)")
    parser.add_argument("--no-job", action="store_true", help="skip the whole-job comparison")
    parser.add_argument("--job-only", action="store_true", help="only the whole-job comparison")
    parser.add_argument("--published-job", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.published_job:
        published_job(args.published_job, args.device)
        return
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    # A data dir of the benchmark's own, left empty: the Debian copy serves, the cache goes here.
    os.environ["AGD_DATA"] = tempfile.gettempdir() + "/torch-agd-bench"
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if not args.job_only:
        throughput(devices)
    if not args.no_job:
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            whole_job(args.repeats, device)


if __name__ == "__main__":
    main()
