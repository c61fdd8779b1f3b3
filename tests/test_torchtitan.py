"""AGD inside torchtitan (docs/integrations.md, "torchtitan"): torch_agd.integrations.torchtitan's
AGDOptimizers on torchtitan's own Llama 3 debug model.

torchtitan's language models attend with FlexAttention or varlen attention; on the CPU the
first has no backward ("FlexAttention does not support backward on CPU") and the second needs
CUDA's flash attention, so the model here is the debug model with torchtitan's own
ScaledDotProductAttention module as its inner attention (causal, no document masks): every
parameter and every module that holds one is the debug model's. Skipped where torchtitan
(`pip install "torch-agd[torchtitan]"`) does not import.
"""
import copy
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("torchtitan.components.optimizer", reason="needs torchtitan (the torchtitan extra)")
pytest.importorskip("torchtitan.models.llama3", reason="needs torchtitan (the torchtitan extra)")

from torchtitan.components.optimizer import LRSchedulersContainer  # noqa: E402
from torchtitan.models.common.attention import ScaledDotProductAttention  # noqa: E402
from torchtitan.models.llama3 import model_registry  # noqa: E402

from torch_agd import AGD, init_weights_  # noqa: E402
from torch_agd.errors import UsageError  # noqa: E402
from torch_agd.integrations.torchtitan import AGDOptimizers, with_agd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ, BATCH, STEPS = 2048, 32, 4, 3


def debug_config(layers: int = 6):
    """The llama3 debug model's config, on SDPA (see above), with its first ``layers`` layers."""
    config = model_registry("debugmodel").model
    config.layers = config.layers[:layers]
    for layer in config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return config


def debug_model(layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = debug_config(layers).build()
    model.init_states(buffer_device=torch.device("cpu"))
    return model


def batches(n: int = STEPS):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen) for _ in range(n)]


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def kinds(opt) -> dict[str, str]:
    return {name: g["kind"] for g in opt.param_groups for name in g["param_names"]}


def test_every_parameter_of_the_llama3_debug_model_gets_its_rule():
    model = debug_model()
    opt = AGDOptimizers.Config().build(model_parts=[model]).agd
    got = kinds(opt)
    assert set(got) == {name for name, _ in model.named_parameters()}
    for name, kind in got.items():
        if name == "tok_embeddings.weight":
            assert kind == "embedding"
        elif name.endswith("norm.weight"):  # attention_norm, ffn_norm, the final norm: torch's RMSNorm
            assert kind == "norm", name
        else:  # wqkv, wo, w1, w2, w3, lm_head: torch's Linear
            assert kind == "weight" and name.split(".")[-2] in ("wqkv", "wo", "w1", "w2", "w3", "lm_head"), name
    # L: two residual branches per layer (attention, feed-forward) + the embedding + the head
    assert opt.depth == 2 * 6 + 2


def test_the_experts_of_torchtitans_moe_are_stacked_matrices():
    from torchtitan.models.qwen3 import model_registry as qwen3

    model = qwen3("debugmodel_moe").model.build()
    got = kinds(AGD(model))
    experts = {name: kind for name, kind in got.items() if ".inner_experts." in name}
    assert experts and set(experts.values()) == {"stacked"}
    assert got["layers.0.moe.router.gate.weight"] == "weight" and "raw" not in got.values()


def test_separate_q_k_v_are_three_weights():
    from torchtitan.models.common.attention import QKVLinear
    from torchtitan.models.common.linear import Linear

    qkv = QKVLinear(QKVLinear.Config(head_dim=16, wq=Linear.Config(in_features=64, out_features=64),
                                     wkv=Linear.Config(in_features=64, out_features=32)))
    assert kinds(AGD(qkv)) == {"wq.weight": "weight", "wk.weight": "weight", "wv.weight": "weight"}


def test_the_container_steps_as_agd_in_a_plain_loop_bitwise():
    """torchtitan's order of a step (clip_grad_norm_ at with_agd's max_norm, the container's step,
    the lr schedulers' step) against AGD(model) stepped by hand, momentum and all."""
    from torchtitan.distributed.utils import clip_grad_norm_

    titan, plain = debug_model(layers=2), debug_model(layers=2)
    config = with_agd(SimpleNamespace(training=SimpleNamespace(max_norm=1.0)), momentum=0.9)
    opts = config.optimizer.build(model_parts=[titan])
    scheds = config.lr_scheduler.build(optimizers=opts, training_steps=STEPS)
    ref = AGD(plain, momentum=0.9)
    for tokens in batches():
        opts.zero_grad()
        lm_loss(titan, tokens).backward()
        clip_grad_norm_(list(titan.parameters()), config.training.max_norm, foreach=True)
        opts.step()
        scheds.step()
        ref.zero_grad()
        lm_loss(plain, tokens).backward()
        ref.step()
    assert opts.agd.steps.item() == STEPS and torch.equal(opts.agd.eta, ref.eta)
    for (name, a), b in zip(titan.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name


def test_torchtitans_command_line_takes_the_agd_config_and_its_overrides():
    """What `torchrun -m torchtitan.train --module torch_agd.integrations.torchtitan --config
    llama3_debugmodel_agd --optimizer.gain 2` parses (its Trainer needs a GPU: see the top)."""
    pytest.importorskip("torchtitan.trainer", reason="needs the whole of torchtitan")
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args(["--module", "torch_agd.integrations.torchtitan", "--config",
                                         "llama3_debugmodel_agd", "--optimizer.gain", "2", "--optimizer.momentum", "0.9"])
    assert isinstance(config.optimizer, AGDOptimizers.Config)
    assert (config.optimizer.gain, config.optimizer.momentum, config.training.max_norm) == (2.0, 0.9, math.inf)
    assert (config.lr_scheduler.warmup_steps, config.lr_scheduler.decay_ratio) == (0, 0.0)


def test_init_weights_draws_agds_initialisation():
    a, b = debug_model(layers=1), debug_model(layers=1)
    torch.manual_seed(5)
    AGDOptimizers.Config(init_weights=True).build(model_parts=[a])
    torch.manual_seed(5)
    init_weights_(b)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_a_checkpoint_of_the_container_resumes_bitwise():
    """The container's flat, name-keyed state (what torchtitan's checkpointer saves), taken after
    one step and loaded into a fresh model and container, continues as the uninterrupted run."""
    steps = batches()
    run, cut = debug_model(layers=1), debug_model(layers=1)
    opts = AGDOptimizers.Config(momentum=0.9).build(model_parts=[run])
    first = AGDOptimizers.Config(momentum=0.9).build(model_parts=[cut])
    fresh = AGDOptimizers.Config(momentum=0.9).build(model_parts=[debug_model(layers=1, seed=7)])
    before = fresh.state_dict()  # a checkpoint before any step counts no step
    assert before["state.tok_embeddings.weight.steps"].item() == 0

    for opt, model, todo in ((opts, run, steps), (first, cut, steps[:1])):
        for tokens in todo:
            opt.zero_grad()
            lm_loss(model, tokens).backward()
            opt.step()
    saved = copy.deepcopy((cut.state_dict(), first.state_dict()))
    fresh.model_parts[0].load_state_dict(saved[0])
    fresh.load_state_dict(saved[1])
    for tokens in steps[1:]:
        fresh.zero_grad()
        lm_loss(fresh.model_parts[0], tokens).backward()
        fresh.step()
    assert fresh.agd.steps.item() == STEPS
    for (name, a), b in zip(run.named_parameters(), fresh.model_parts[0].parameters()):
        assert torch.equal(a, b), name


def test_what_agd_cannot_do_in_torchtitan_is_one_line():
    model = debug_model(layers=1)
    with pytest.raises(UsageError, match="pipeline parallelism"):
        AGDOptimizers.Config().build(model_parts=[model, debug_model(layers=1)])
    model.lm_head = None  # what pipeline_llm leaves on a stage without the head
    with pytest.raises(UsageError, match="pipeline_parallel_degree = 1"):
        AGDOptimizers.Config().build(model_parts=[model])
    from torchtitan.components.optimizer import ParamGroupConfig

    groups = [ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})]
    with pytest.raises(UsageError, match="no param_groups"):
        AGDOptimizers.Config(param_groups=groups).build(model_parts=[debug_model(layers=1)])


# ---------------------------------------------------------------- FSDP2, 2 gloo ranks

def _fsdp_rank(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: the debug model sharded as torchtitan's apply_fsdp_to_decoder does
    (each layer, then the root), the container built on the shards, each rank on its half of
    every batch; rank 0 saves the whole weights after the steps."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = debug_model(layers=2)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opts = AGDOptimizers.Config().build(model_parts=[model])
    for tokens in batches():
        opts.zero_grad()
        lm_loss(model, tokens.chunk(2)[rank]).backward()
        opts.step()
    whole = {name: p.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"weights": whole, "eta": opts.agd.eta, "depth": opts.agd.depth}, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_the_container_on_an_fsdp2_sharded_model_matches_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "sharded.pt"
    mp.start_processes(_fsdp_rank, args=(port, str(out)), nprocs=2, start_method="spawn")
    sharded = torch.load(out, weights_only=True)
    plain = debug_model(layers=2)
    ref = AGD(plain)
    for tokens in batches():
        ref.zero_grad()
        lm_loss(plain, tokens).backward()
        ref.step()
    assert sharded["depth"] == ref.depth
    assert math.isclose(sharded["eta"].item(), ref.eta.item(), rel_tol=1e-5)
    for name, p in plain.named_parameters():
        assert (sharded["weights"][name] - p).norm() <= 1e-5 * p.norm(), name
