"""AGD inside the clients people train with: Lightning, transformers.Trainer, accelerate,
torch.amp.GradScaler and torch.compile of a whole training step (docs/integrations.md shows each).

Every run is checked against a loop written here by hand, outside the client (same data, same
order, same AGD), and where a client drives lr, against the step size the paper's rule gives
for that lr: a linear weight of shape (d_out, d_in) is one block, so a step moves it by exactly
lr * gain * eta / L * sqrt(d_out / d_in) in Frobenius norm. The clients come from the
`integrations` extra; a client that is not installed skips its tests.
"""
import copy
import csv
import importlib
import importlib.util
import math
import os

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, TensorDataset

from torch_agd import AGD, init_weights_

# Nothing here may reach a model hub; these also keep transformers from looking.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Lightning's advice for real runs (more dataloader workers, a bigger logging interval).
    pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),  # lightning 2.6 on torch 2.14's pytree
]

gen = torch.Generator().manual_seed(0)
X, Y = torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen)


def need(module):
    """Import ``module``; skip only when its package is not installed at all. A client that is
    installed but fails to import (as lightning < 2.4 does without setuptools' pkg_resources)
    must fail the test, not skip it silently."""
    if importlib.util.find_spec(module.partition(".")[0]) is None:
        pytest.skip(f"{module} is not installed: pip install -e '.[integrations]'")
    return importlib.import_module(module)


def mlp():
    torch.manual_seed(1)
    return init_weights_(nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 3, bias=False)))


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def hand_loop(model, batches, lrs, loss=mse, accumulate=1):
    """AGD driven by hand: one step per ``accumulate`` batches (micro-batch losses divided by
    ``accumulate``), the k-th at lr = lrs[k]."""
    opt = AGD(model, direction="frobenius")
    for k, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        for batch in batches[k * accumulate:(k + 1) * accumulate]:
            (loss(model, batch) / accumulate).backward()
        opt.step()


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


class MoveRecorder:
    """Per step: the lr in force, and how far ``weight`` (one (d_out, d_in) block) moved over eta."""

    def __init__(self, opt, weight):
        self.opt, self.weight, self.lrs, self.moves = opt, weight, [], []

    def before(self):
        self.lrs.append(self.opt.param_groups[0]["lr"])
        self._start = self.weight.detach().clone()

    def after(self):
        self.moves.append(torch.linalg.norm(self.weight.detach() - self._start).item() / self.opt.eta.item())

    def assert_moves_follow_lr(self, gain=1.0):
        d_out, d_in = self.weight.shape
        expected = [lr * gain / self.opt.depth * math.sqrt(d_out / d_in) for lr in self.lrs]
        assert self.moves == pytest.approx(expected, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------- Lightning

def lightning_module(schedule=None, momentum=0.0):
    pl = need("lightning.pytorch")

    class Regression(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            return mse(self.net, batch)

        def configure_optimizers(self):
            opt = AGD(self, momentum=momentum, direction="frobenius")
            if schedule is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR(opt, schedule), "interval": "step"}}

    return Regression()


def lightning_fit(module, tmp_path, epochs, callbacks=(), logger=False, ckpt_path=None):
    pl = need("lightning.pytorch")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, default_root_dir=tmp_path,
                         logger=logger, callbacks=list(callbacks), log_every_n_steps=1, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=16), ckpt_path=ckpt_path)
    return trainer


def schedule(k):
    return 1 / (1 + k)


@pytest.mark.slow
@pytest.mark.parametrize("scheduled", [False, True], ids=["plain", "scheduler"])
def test_lightning_steps_agd_with_its_closure_and_scheduler(tmp_path, scheduled):
    pl = need("lightning.pytorch")
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    module = lightning_module(schedule if scheduled else None)
    start = copy.deepcopy(module.net)

    class Record(pl.Callback):
        # Lightning calls this from inside AGD.step, after AGD ran its closure (forward, backward).
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not hasattr(self, "rec"):
                self.rec = MoveRecorder(optimizer, pl_module.net[0].weight)
            self.rec.before()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rec.after()

    record = Record()
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = lightning_fit(module, tmp_path, 2, [record, LearningRateMonitor(logging_interval="step")], logger)

    lrs = [schedule(k) if scheduled else 1.0 for k in range(8)]
    opt = trainer.optimizers[0]
    assert isinstance(opt, AGD) and opt.steps.item() == 8
    assert record.rec.lrs == pytest.approx(lrs)
    record.rec.assert_moves_follow_lr()
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        logged = [float(row["lr-AGD"]) for row in csv.DictReader(f) if row.get("lr-AGD")]
    assert logged == pytest.approx(lrs)
    batches = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 64, 16)] * 2
    hand_loop(start, batches, lrs)
    assert_same_weights(module.net, start)


@pytest.mark.slow
def test_lightning_checkpoint_resumes_as_if_never_stopped(tmp_path):
    # momentum and the schedule are the state a resume must bring back: AGD's buffers and step
    # count, the scheduler's position.
    whole = lightning_module(schedule, momentum=0.9)
    lightning_fit(whole, tmp_path / "whole", 2)

    first = lightning_module(schedule, momentum=0.9)
    lightning_fit(first, tmp_path / "first", 1).save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = lightning_module(schedule, momentum=0.9)
    opt = lightning_fit(resumed, tmp_path / "resumed", 2, ckpt_path=tmp_path / "epoch1.ckpt").optimizers[0]

    assert opt.steps.item() == 8 and opt.param_groups[0]["lr"] == pytest.approx(schedule(8))
    for p, q in zip(whole.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- transformers.Trainer

@pytest.mark.slow
def test_trainer_builds_its_default_schedule_on_agd(tmp_path):
    transformers = need("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
                                      initializer_range=0.2)  # a gradient norm above 1, for the clipping below
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    start = copy.deepcopy(model)
    tokens = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(2))

    class Rows(Dataset):
        def __len__(self):
            return len(tokens)

        def __getitem__(self, i):
            return {"row": i}

    def collate(items):
        # Trainer shuffles; one batch of all rows, put back in order, is the hand loop's batch.
        rows = sorted(item["row"] for item in items)
        return {"input_ids": tokens[rows], "labels": tokens[rows]}

    opt = AGD(model, direction="frobenius")
    rec = MoveRecorder(opt, model.model.layers[0].mlp.gate_proj.weight)

    class Record(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            rec.before()

        def on_step_end(self, args, state, control, **kwargs):
            rec.after()

    steps, warmup = 6, 2
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, warmup_steps=warmup, per_device_train_batch_size=len(tokens),
        max_grad_norm=0.0,  # Trainer clips to norm 1 by default, which would shrink AGD's eta
        use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no", logging_strategy="no",
        remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate,
                                   optimizers=(opt, None), callbacks=[Record()])
    trainer.train()

    # transformers' linear schedule with warmup, written out
    lrs = [k / warmup if k < warmup else (steps - k) / (steps - warmup) for k in range(steps)]
    assert isinstance(trainer.lr_scheduler, LambdaLR) and opt.steps.item() == steps
    assert rec.lrs == pytest.approx(lrs)
    rec.assert_moves_follow_lr()
    hand_loop(start, [tokens] * steps, lrs, loss=lambda m, t: m(input_ids=t, labels=t).loss)
    assert_same_weights(model, start)


# ---------------------------------------------------------------- accelerate

@pytest.mark.slow
def test_accelerate_steps_agd_once_per_accumulated_batch():
    accelerate = need("accelerate")
    model = mlp()
    start = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = AGD(model, direction="frobenius")
    scheduler = LambdaLR(opt, lambda k: 0.5 ** k)
    model, prepared, loader, scheduler = accelerator.prepare(
        model, opt, DataLoader(TensorDataset(X, Y), batch_size=8), scheduler)
    assert isinstance(prepared, accelerate.optimizer.AcceleratedOptimizer)
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(mse(model, (x, y)))
            prepared.step()
            scheduler.step()
            prepared.zero_grad()

    # 8 micro-batches, 2 per step: AGD stepped 4 times and the scheduler moved 4 times
    assert opt.steps.item() == 4 and opt.skipped_steps.item() == 0
    assert opt.param_groups[0]["lr"] == 0.5 ** 4
    batches = [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 64, 8)]
    hand_loop(start, batches, [0.5 ** k for k in range(4)], accumulate=2)
    assert_same_weights(model, start)


# ---------------------------------------------------------------- GradScaler

@pytest.mark.parametrize("autocast", [None, torch.float16], ids=["fp32", "fp16-autocast"])
def test_grad_scaler_unscales_before_agd_steps(autocast):
    # AGD's eta grows with the gradient's size, so a step on scaled gradients would be far too
    # long: scaler.step must unscale first. The scale is a power of two, so unscaling is exact.
    model, plain = mlp(), mlp()
    opt, plain_opt = AGD(model, direction="frobenius"), AGD(plain, direction="frobenius")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for k in range(4):
        x, y = X[16 * k:16 * k + 16], Y[16 * k:16 * k + 16]
        for net, o, scale in ((model, opt, scaler.scale), (plain, plain_opt, lambda loss: loss)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = nn.functional.mse_loss(net(x), y)
            scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        plain_opt.step()
    assert scaler.get_scale() == 2.0 ** 12 and opt.steps.item() == 4
    # fp16 gradients of the unscaled loss lose low bits that the scaled ones keep
    tol = 0 if autocast is None else 1e-5
    torch.testing.assert_close(opt.eta, plain_opt.eta, rtol=tol, atol=tol)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=tol)


def test_grad_scaler_skips_agd_on_an_inf_gradient():
    model = mlp()
    opt = AGD(model, direction="frobenius")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(nn.functional.mse_loss(model(X), Y)).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]

    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(X * math.inf), Y)).backward()
    scaler.step(opt)
    scaler.update()
    # the scaler skipped the step itself: AGD was not called, so it counted neither a step nor a skip
    assert opt.steps.item() == 1 and opt.skipped_steps.item() == 0
    assert scaler.get_scale() == 2.0 ** 11
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


# ---------------------------------------------------------------- torch.compile

@pytest.mark.slow
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph-lr-by-hand", "scheduler"])
def test_compiled_training_step_matches_eager(fullgraph):
    from torch._dynamo.testing import CompileCounterWithBackend

    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch cannot trace loss.backward() into the graph")
    compiled_net, eager_net = mlp(), mlp()
    compiled_opt, eager_opt = AGD(compiled_net, gain=2.0, direction="frobenius"), AGD(eager_net, gain=2.0, direction="frobenius")
    # An LR scheduler wraps opt.step in a function Dynamo will not trace (for torch's own
    # optimizers too), so one graph for the whole step means setting lr by hand.
    schedules = [] if fullgraph else [LambdaLR(o, schedule) for o in (compiled_opt, eager_opt)]

    def train_step(net, opt, x, y):
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()  # a returned loss whose graph backward consumed breaks the trace

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(train_step, backend=counter, fullgraph=fullgraph)
    frames = []
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for k in range(5):
            x, y = X[8 * k:8 * k + 8], Y[8 * k:8 * k + 8]
            for opt in (compiled_opt, eager_opt):
                opt.zero_grad()  # Dynamo does not trace Optimizer.zero_grad
                if fullgraph:
                    opt.param_groups[0]["lr"] = schedule(k)
            torch.testing.assert_close(compiled(compiled_net, compiled_opt, x, y),
                                       train_step(eager_net, eager_opt, x, y), rtol=1e-6, atol=0)
            for s in schedules:
                s.step()
            frames.append(counter.frame_count)
    torch._dynamo.reset()
    assert compiled_opt.steps.item() == 5 and compiled_opt.param_groups[0]["lr"] == eager_opt.param_groups[0]["lr"]
    torch.testing.assert_close(compiled_opt.eta, eager_opt.eta, rtol=1e-6, atol=0)
    for p, q in zip(compiled_net.parameters(), eager_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # the first step creates eta and the counters, so the second compiles anew; a changing lr does not
    assert frames[1] == frames[-1]
