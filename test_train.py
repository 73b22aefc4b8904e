"""
Tests of model.py, train.py and sample.py on a tiny model and tiny synthetic data (CPU, fast).
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import lighthouse_kernel as lk
import model
import sample
import train
from model import GPT, GPTConfig, load_checkpoint, read_config_file

TINY = dict(
    block_size=512, batch_size=2, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64,
    lh_levels=2, lh_pool=4, lh_topk=128, dense_layers=[-1], lighthouse_iters=6, recovery_iters=4,
    learning_rate=1e-2, warmup_iters=2, eval_interval=5, eval_iters=2, log_interval=1, ckpt_interval=5,
    sample_at_end=False, device="cpu",
)


def write_dataset(folder):
    """A byte-level dataset whose text repeats, so a tiny model learns it in a few steps; meta.json
    as prepare_data.py writes it."""
    rng = np.random.default_rng(0)
    words = [b"the ", b"light ", b"house ", b"keeps ", b"watch ", b"over ", b"sea ", b"\n"]
    text = b"".join(words[i] for i in rng.integers(0, len(words), 20000))
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    splits = dict(train=tokens[:-10000], val=tokens[-10000:])
    for split, part in splits.items():
        part.tofile(folder / f"{split}.bin")
    meta = dict(tokenizer="bytes", vocab_size=257, eot_id=256, dtype="uint16",
                **{split: dict(docs=1, tokens=len(part)) for split, part in splits.items()})
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def run(dataset, out_dir, **overrides):
    config = dict(train.DEFAULTS, **TINY, dataset=dataset, out_dir=str(out_dir))
    config.update(overrides)
    return train.train(config)


def records(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def untimed_records(out_dir):
    """metrics.jsonl without the fields that depend on the machine's speed."""
    timing = ("elapsed_s", "tok_per_s", "mfu", "peak_mem_gb")
    return [{k: v for k, v in r.items() if k not in timing} for r in records(out_dir)]


def train_losses(out_dir):
    return {r["iter"]: r["train_loss"] for r in records(out_dir) if "train_loss" in r}


def test_two_phases_switch_and_learn(dataset, tmp_path):
    summary = run(dataset, tmp_path)
    log = records(tmp_path)
    phases = {r["iter"]: r["phase"] for r in log if "train_loss" in r}
    assert [phases[i] for i in range(1, 11)] == ["lighthouse"] * 6 + ["dense"] * 4  # switch after 6
    losses = train_losses(tmp_path)
    assert all(np.isfinite(list(losses.values())))
    assert all(r["grad_norm"] > 0 for r in log if "train_loss" in r)
    assert losses[10] < losses[1] - 0.5  # it learns
    evals = [r for r in log if "val_loss" in r]
    assert all("val_loss_lighthouse" in r for r in evals if r["phase"] == "lighthouse")
    assert summary["final_val_loss"] == evals[-1]["val_loss"] and evals[-1]["iter"] == 10
    assert set(summary["tok_per_s"]) == {"lighthouse", "dense"}
    assert os.path.exists(tmp_path / "ckpt.pt")


def test_phase_rates_leave_out_the_first_step(dataset, tmp_path, monkeypatch, capsys):
    """The first step of each phase compiles (on a GPU): here it is made 0.5 s slower. The summary
    times it apart, and its steady rate is the log lines' after the phase's first (one step each)."""
    slow, original = set(), train.Run.step

    def first_step_slow(run, ctrl_c, phase):
        if run.raw_model.mode not in slow:
            slow.add(run.raw_model.mode)
            time.sleep(0.5)
        return original(run, ctrl_c, phase)

    monkeypatch.setattr(train.Run, "step", first_step_slow)
    summary = run(dataset, tmp_path)
    tokens_per_step = TINY["batch_size"] * TINY["block_size"]
    for phase in ("lighthouse", "dense"):
        assert summary["first_step_seconds"][phase] >= 0.5
        steady = [r for r in records(tmp_path) if r["phase"] == phase and "tok_per_s" in r][1:]
        seconds = sum(tokens_per_step / r["tok_per_s"] for r in steady)
        assert summary["tok_per_s"][phase] == pytest.approx(tokens_per_step * len(steady) / seconds, rel=0.05)
    printed = capsys.readouterr().out
    for phase in ("lighthouse", "dense"):
        first, rate = summary["first_step_seconds"][phase], summary["tok_per_s"][phase]
        assert re.search(rf"^  {phase} phase: \d+ s = {first:.1f} s in its first step \(compilation, warm-up\) "
                         rf"\+ \d+ s at {rate:,.0f} tok/s \(steady\)$", printed, re.M), printed


def test_dense_baseline_has_no_lighthouse_phase(dataset, tmp_path):
    run(dataset, tmp_path, lighthouse_iters=0, recovery_iters=3, eval_interval=100)
    assert {r["phase"] for r in records(tmp_path)} == {"dense"}


SHORT = dict(short_context_iters=3, short_block_size=128, lighthouse_iters=4, recovery_iters=3)  # 10 in all


@pytest.mark.parametrize("killed_at, extra", [(8, {}), (10, {}), (3, SHORT),
                                              (4, dict(SHORT, copy_passages=2, copy_length=32, copy_source="letters"))])
def test_resume_after_a_kill_continues_exactly(dataset, tmp_path, monkeypatch, killed_at, extra):
    # evals every 3 iterations: one falls on the switch (after 6), whose checkpoint a kill in
    # iteration 8 resumes from; a kill in iteration 10 resumes from the periodic one after 9.
    # With the context-length warmup: kills in its last step and in the first Lighthouse step both
    # resume inside the warmup, from the checkpoint after 2
    settings = dict(eval_interval=3, ckpt_interval=3 if not extra else 2, **extra)
    run(dataset, tmp_path / "whole", **settings)
    expected = train_losses(tmp_path / "whole")
    expected_evals = [(r["iter"], r["val_loss"]) for r in records(tmp_path / "whole") if "val_loss" in r]

    calls = {"n": 0}
    original = train.Batches.next

    def dies(self, *window):
        if self.path.endswith("train.bin"):
            calls["n"] += 1
            if calls["n"] == killed_at:
                raise KeyboardInterrupt
        return original(self, *window)

    monkeypatch.setattr(train.Batches, "next", dies)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, tmp_path / "killed", **settings)
    monkeypatch.setattr(train.Batches, "next", original)
    run(dataset, tmp_path / "killed", init_from="resume", **settings)
    # the same losses, every iteration, to the last bits: another batch or learning rate would move
    # them by 1e-3 or more; once in a while MKL's float sums come out 1e-7 apart for the same
    # numbers in memory laid out otherwise (its results depend on alignment), hence rel=1e-6
    assert train_losses(tmp_path / "killed") == pytest.approx(expected, rel=1e-6, abs=0)
    iters = [r["iter"] for r in records(tmp_path / "killed") if "train_loss" in r]
    assert iters == sorted(iters) and len(iters) == 10  # no duplicated records after the resume
    evals = [(r["iter"], r["val_loss"]) for r in records(tmp_path / "killed") if "val_loss" in r]
    assert [i for i, _ in evals] == [i for i, _ in expected_evals]
    assert [v for _, v in evals] == pytest.approx([v for _, v in expected_evals], rel=1e-6, abs=0)


def test_context_length_warmup_trains_short_windows_dense_then_the_phases(dataset, tmp_path, monkeypatch):
    """short_context_iters steps on windows of short_block_size (as many tokens per step), with
    dense attention, then the two phases at block_size; the schedule spans all three."""
    seen = []  # (windows shape, attention mode) of every training batch
    step, next_batch = train.Run.step, train.Batches.next

    def recording_step(run, ctrl_c, phase):
        seen.append(run.raw_model.mode)
        return step(run, ctrl_c, phase)

    def recording_next(batches, *window):
        x, y = next_batch(batches, *window)
        if batches.path.endswith("train.bin"):
            seen.append(tuple(x.shape))
        return x, y

    monkeypatch.setattr(train.Run, "step", recording_step)
    monkeypatch.setattr(train.Batches, "next", recording_next)
    summary = run(dataset, tmp_path, **SHORT, lr_schedule="cosine")
    modes, shapes = seen[0::2], seen[1::2]
    assert shapes == [(8, 128)] * 3 + [(2, 512)] * 7  # 2 x 512 tokens per step throughout
    assert modes == ["dense"] * 3 + ["lighthouse"] * 4 + ["dense"] * 3
    phases = [r["phase"] for r in records(tmp_path) if "train_loss" in r]
    assert phases == ["short"] * 3 + ["lighthouse"] * 4 + ["dense"] * 3
    assert set(summary["tok_per_s"]) == {"short", "lighthouse", "dense"}
    evals = [r for r in records(tmp_path) if "val_loss" in r]  # at full length, Lighthouse mode in phase 1 only
    assert [r["iter"] for r in evals if "val_loss_lighthouse" in r] == [5, 7]
    config = {**train.DEFAULTS, **TINY, **SHORT, "lr_schedule": "cosine"}
    assert train.learning_rate(9, config) == pytest.approx(config["min_lr"])  # the last of 10 iterations
    assert train.learning_rate(8, config) > config["min_lr"]


def repeats(row, length):
    """(first, later) positions of every passage of `length` tokens that occurs twice in a row."""
    seen, found = {}, []
    for i in range(len(row) - length + 1):
        passage = tuple(row[i:i + length].tolist())
        if passage in seen:
            found.append((seen[passage], i))
        seen.setdefault(passage, i)
    return found


def test_copy_passages_are_planted_in_training_windows(tmp_path):
    """copy_passages: each training window holds its passages twice, at log-uniform distances
    (short and long both common); without copies (validation) random text repeats nothing; the
    ranks of DDP keep their share of the same planted windows."""
    path = tmp_path / "random.bin"
    np.random.default_rng(0).integers(0, 257, 100_000).astype(np.uint16).tofile(path)
    config = dict(train.DEFAULTS, batch_size=4, block_size=511, copy_length=16)
    windows = lambda batches: torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in  # noqa: E731
                                         (batches.next() for _ in range(50))])  # (200, 512): whole windows
    distances = []
    for row in windows(train.Batches(str(path), config, "cpu", seed=1, copies=1)):
        found = {later - first for first, later in repeats(row, 16)}  # (a chance match extends it by a token)
        assert len(found) == 1  # one passage, twice
        distances += found
    assert min(distances) >= 16 and max(distances) <= 512 - 16
    assert sum(d < 64 for d in distances) > 20 and sum(d > 128 for d in distances) > 20  # log-uniform: 16..496
    assert not any(repeats(row, 16) for row in windows(train.Batches(str(path), config, "cpu", seed=1)))
    whole = train.Batches(str(path), dict(config, batch_size=2), "cpu", seed=1, copies=3).next()[0]
    halves = [train.Batches(str(path), dict(config, batch_size=1), "cpu", seed=1, rank=r, world_size=2, copies=3)
              .next()[0] for r in (0, 1)]
    assert torch.equal(whole, torch.cat(halves))


def test_copy_source_letters_plants_random_letters_twice(tmp_path):
    """copy_source = 'letters': the passage is random letters written at both points (not the window's
    own text), a new one each time; the ranks of DDP keep their share of the same planted windows."""
    path = tmp_path / "random.bin"
    np.random.default_rng(0).integers(0, 257, 100_000).astype(np.uint16).tofile(path)
    config = dict(train.DEFAULTS, batch_size=4, block_size=511, copy_length=16)
    letters = list(range(ord("a"), ord("z") + 1))
    batches = train.Batches(str(path), config, "cpu", seed=1, copies=1, letters=letters)
    passages = []
    for _ in range(25):
        x, y = batches.next()
        for row in torch.cat([x, y[:, -1:]], 1):  # (512,): the whole window
            found = repeats(row, 16)  # one passage, twice (random text repeats nothing)
            assert len({later - first for first, later in found}) == 1  # (a chance match extends it by a token)
            letter_runs = [row[first:first + 16].tolist() for first, _ in found
                           if all(token in letters for token in row[first:first + 16].tolist())]
            assert len(letter_runs) == 1  # the passage: letters only
            passages += letter_runs
    assert len({tuple(p) for p in passages}) == len(passages)  # a fresh passage every time
    whole = train.Batches(str(path), dict(config, batch_size=2), "cpu", seed=1, copies=3, letters=letters).next()[0]
    halves = [train.Batches(str(path), dict(config, batch_size=1), "cpu", seed=1, rank=r, world_size=2, copies=3,
                            letters=letters).next()[0] for r in (0, 1)]
    assert torch.equal(whole, torch.cat(halves))


def test_learning_rate_warmup_then_constant_or_cosine():
    """Hand-computed: peak 1e-2, min 1e-3, 2 warmup iterations, 11 iterations in all (0..10), so the
    cosine runs over iterations 2..10, a quarter of its way (pi/4) at iteration 4."""
    config = dict(train.DEFAULTS, learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lighthouse_iters=5,
                  recovery_iters=6)
    lr = {it: train.learning_rate(it, dict(config, lr_schedule="cosine")) for it in range(12)}
    assert lr[0] == pytest.approx(5e-3) and lr[1] == pytest.approx(1e-2)  # warmup: 1/2, then 2/2 of the peak
    assert lr[2] == pytest.approx(1e-2)
    assert lr[4] == pytest.approx(8.681981e-3)  # 1e-3 + 9e-3 * (1 + cos(pi/4)) / 2
    assert lr[6] == pytest.approx(5.5e-3)  # halfway
    assert lr[8] == pytest.approx(2.318019e-3)  # 1e-3 + 9e-3 * (1 - cos(pi/4)) / 2
    assert lr[10] == pytest.approx(1e-3) and lr[11] == pytest.approx(1e-3)  # min_lr at the last iteration
    assert all(lr[it] > lr[it + 1] for it in range(2, 10))
    constant = [train.learning_rate(it, config) for it in (0, 1, 2, 10, 100)]
    assert constant == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2, 1e-2])
    assert train.learning_rate(0, dict(config, warmup_iters=0)) == pytest.approx(1e-2)


def test_state_dict_is_the_same_in_both_modes():
    torch.manual_seed(0)
    config = GPTConfig(block_size=512, vocab_size=257, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                       ffn_hidden=64, lh_levels=2, lh_pool=4, lh_topk=128, dense_layers=[0])
    model = GPT(config)
    x = torch.randint(0, 257, (1, 512))
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_out = model(x)[0]
    model.set_attention("lighthouse")
    assert model.lighthouse_layers() == [1, 2]
    state = model.state_dict()
    assert state.keys() == dense_state.keys() and all(torch.equal(state[k], dense_state[k]) for k in state)
    assert not torch.allclose(model(x)[0], dense_out)  # same weights, different attention


class CountAttention(TorchDispatchMode):
    """Records the query shape (B, heads, S, hd) of every attention kernel that really runs forward."""

    def __init__(self):
        super().__init__()
        self.queries = []

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        if op in model.ATTENTION_OPS:
            self.queries.append(args[0].shape)
        return op(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["dense", "lighthouse"])
def test_flops_per_token_is_the_work_a_training_step_runs(mode):
    """flops_per_token against one forward + backward of the model: its matrix multiplies as torch's
    FLOP counter measures them, plus each attention kernel it runs, from the shapes it is called
    with: causal attention over S entries is QK^T and AV with the upper half masked, 2 * S^2 * hd
    multiply-adds per head, 3 times that with the backward. (The norms' gains, 0.6% of the
    parameters here, are in flops_per_token's 6 per parameter but run no matrix multiply.)"""
    torch.manual_seed(0)
    net = GPT(GPTConfig(block_size=512, vocab_size=257, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                        ffn_hidden=64, lh_levels=2, lh_pool=4, lh_topk=128, dense_layers=[0]))
    net.set_attention(mode)
    x = torch.randint(0, 257, (1, 513))
    with FlopCounterMode(display=False) as counter, CountAttention() as attention:
        net(x[:, :-1], x[:, 1:])[1].backward()
    assert {op.__name__ for op in counter.get_flop_counts()["Global"]} == {"mm"}  # attention is not in it
    kernels = [(S, heads * hd) for B, heads, S, hd in attention.queries]
    # Lighthouse layers (1 and 2) attend over 512/4 + 4*128 = 640 gathered entries, dense ones over 512
    assert kernels == ([(512, 32)] * 3 if mode == "dense" else [(512, 32), (640, 32), (640, 32)])
    measured = counter.get_total_flops() + sum(3 * 2 * S * S * width for S, width in kernels)
    assert net.flops_per_token(mode) * 512 == pytest.approx(measured, rel=0.01)


def test_tied_weights_are_one_tensor_through_training(dataset, tmp_path):
    """tie_weights=True: the output layer's weight is the embedding, one tensor that trains (the run
    learns), is saved as one and comes back tied from the checkpoint."""
    run(dataset, tmp_path, tie_weights=True)
    losses = train_losses(tmp_path)
    assert losses[10] < losses[1] - 0.5
    net, ckpt = GPT.from_checkpoint(str(tmp_path / "ckpt.pt"))
    assert net.lm_head.weight is net.embed.weight
    assert torch.equal(ckpt["model"]["lm_head.weight"], ckpt["model"]["embed.weight"])  # the same after training
    untied = GPT(GPTConfig.from_settings(dict(TINY, vocab_size=257)))
    assert not torch.equal(untied.lm_head.weight, untied.embed.weight)
    count = sum(p.numel() for p in net.parameters())
    assert count == sum(p.numel() for p in untied.parameters()) - 257 * TINY["n_embd"]  # one matrix fewer


@pytest.mark.parametrize("grad_clip", [0.05, 0.0])
def test_gradient_clipping_bounds_the_gradient_adamw_steps_with(dataset, tmp_path, monkeypatch, grad_clip):
    """grad_clip=0.05 scales every gradient (all larger here: their norms are logged before clipping)
    down to norm 0.05 before AdamW's step; grad_clip=0 leaves them as they are."""
    norms, original = [], GPT.configure_optimizer

    def watched(self, *args):
        optimizer = original(self, *args)

        def before_step(optimizer, args, kwargs):  # the norm of all gradients together
            grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"]]
            norms.append(torch.cat(grads).norm().item())

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    monkeypatch.setattr(GPT, "configure_optimizer", watched)
    run(dataset, tmp_path, grad_clip=grad_clip, lighthouse_iters=3, recovery_iters=2, eval_interval=100)
    logged = [r["grad_norm"] for r in records(tmp_path) if "grad_norm" in r]
    assert len(logged) == len(norms) == 5 and min(logged) > 0.1
    assert norms == pytest.approx([0.05] * 5 if grad_clip else logged, rel=1e-4)


def test_lighthouse_model_is_causal():
    """Through every layer, with Lighthouse in two of three: d logits[t] / d embedding[s] = 0 for s > t."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=512, vocab_size=257, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                          ffn_hidden=64, lh_levels=2, lh_pool=4, lh_topk=128, dense_layers=[-1]))
    model.set_attention("lighthouse")
    x = torch.randint(0, 257, (1, 512))
    embedded = {}

    def keep(module, inputs, output):
        output.retain_grad()
        embedded["x"] = output

    model.embed.register_forward_hook(keep)
    for t in [0, 3, 100, 300, 510]:
        logits, _ = model(x)
        logits[0, t].sum().backward()
        grad = embedded["x"].grad[0]
        assert grad[t + 1:].abs().max() == 0 and grad[: t + 1].abs().max() > 0


@pytest.mark.parametrize("mode", ["dense", "lighthouse"])
def test_activation_checkpointing_changes_nothing_but_memory(mode):
    config = dict(block_size=512, vocab_size=257, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64,
                  lh_levels=2, lh_pool=4, lh_topk=128, dense_layers=[-1])
    x = torch.randint(0, 257, (2, 513))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**config, activation_checkpointing=checkpointing))
        model.set_attention(mode)
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the block in backward
        results.append((loss, [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


def test_checkpoint_keep_attention_runs_attention_once():
    """With checkpoint_keep_attention the backward reuses each block's attention output instead of
    recomputing it (one attention call per block, not two); losses and gradients do not change."""
    config = dict(block_size=256, vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, ffn_hidden=64,
                  activation_checkpointing=True)
    x = torch.randint(0, 257, (2, 257))

    class CountAttention(TorchDispatchMode):  # sees the attention kernels that really run
        calls = 0

        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            self.calls += op == torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
            return op(*args, **(kwargs or {}))

    results = []
    for keep in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**config, checkpoint_keep_attention=keep))
        with CountAttention() as counter:
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
        assert counter.calls == (2 if keep else 4)  # per block: the forward, and the recompute unless kept
        results.append((loss, [p.grad for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))
    with pytest.raises(ValueError, match="activation_checkpointing=True"):
        GPTConfig(checkpoint_keep_attention=True).check()


@pytest.mark.parametrize("keep", [False, True], ids=["plain", "keep_attention"])
def test_compiled_checkpointing_recomputes_the_lighthouse_ops(monkeypatch, keep):
    """Compiled with activation checkpointing, the forward keeps no output of a Lighthouse op
    (gather, scatter, ...) for the backward: the backward recomputes them, as it does eager. The
    ops run inside torch.autograd.Functions, whose ops torch.compile before torch 2.12 left
    unmarked under plain checkpointing, so that every Lighthouse layer's gathered q, k, v and
    scattered output were kept (0.29 GiB a layer at paper_98k) unless a policy marks them
    (model.recompute_all). What is kept: the forward graph's values that the backward graph takes."""
    from functorch.compile import nop
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    monkeypatch.setattr(model, "lighthouse_attention", functools.partial(lk.lighthouse_attention, impl="triton"))
    kept = []

    def partition(joint, inputs, **kwargs):
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kwargs)
        made_by = {n.name: n.target for n in fw.graph.nodes if n.op == "call_function"}  # not the inputs
        kept.extend(made_by.get(n.name) for n in bw.graph.find_nodes(op="placeholder")
                    if not n.name.startswith("tangents"))
        return fw, bw

    config = dict(block_size=512, vocab_size=257, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64,
                  lh_levels=2, lh_pool=4, lh_topk=128, dense_layers=[-1], activation_checkpointing=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton interpreter runs only where no GPU is
    gpt = GPT(GPTConfig(**config, checkpoint_keep_attention=keep)).to(device)
    gpt.set_attention("lighthouse")
    x = torch.randint(0, 257, (1, 513), device=device)
    compiled = torch.compile(gpt, dynamic=False, backend=aot_autograd(fw_compiler=nop, partition_fn=partition))
    compiled(x[:, :-1], x[:, 1:])
    assert None in kept  # the forward's inputs: the weights, the tokens
    assert not [t for t in kept if getattr(t, "namespace", None) == "lighthouse"], kept


def test_dense_model_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, ffn_hidden=64))
    x = torch.randint(0, 257, (1, 64))
    y = x.clone()
    y[0, 40:] = torch.randint(0, 257, (24,))
    assert torch.allclose(model(x)[0][:, :40], model(y)[0][:, :40], atol=1e-6)
    assert not torch.allclose(model(x)[0][:, 40:], model(y)[0][:, 40:])


@pytest.mark.parametrize("overrides, message", [
    (dict(lh_topk=256), "smallest valid sequence length is 1024"),
    (dict(block_size=514), "nearest valid: 512 or 516"),
    (dict(n_kv_head=3, n_head=4, n_embd=32), "n_head .* must be a multiple of n_kv_head"),
    (dict(n_embd=31), "n_embd .* must be a multiple of n_head"),
    (dict(dense_layers=[2]), "dense_layers entry 2"),
    (dict(lighthouse_iters=0, recovery_iters=0), "nothing to train"),
    (dict(dataset="/nonexistent/folder"), "train.bin not found"),
    (dict(init_from="resume", out_dir="/nonexistent/out"), "ckpt.pt does not exist"),
    (dict(n_head=0), "n_head must be >= 1"),
    (dict(n_embd=0), "n_embd must be >= 1"),
    (dict(eval_iters=0), "eval_iters must be >= 1"),
    (dict(out_dir=__file__), "is a file, not a folder"),
    (dict(device="gpu"), "device must be"),
    (dict(grad_clip=-1.0), r"grad_clip must be >= 0, got -1.0 \(grad_clip: .*0 disables clipping"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
    (dict(beta1=1.5), r"beta1 must be in \[0, 1\), got 1.5"),
    (dict(beta2=-1.0), r"beta2 must be in \[0, 1\), got -1.0"),
    (dict(learning_rate=0.0), "learning_rate must be > 0, got 0.0"),  # not a complaint about min_lr
    (dict(min_lr=0.1), r"min_lr \(0.1\) must not be above learning_rate \(0.01\)"),
    (dict(learning_rate=float("inf")), "learning_rate must be a finite number"),
    (dict(weight_decay=100.0), "learning_rate \\* weight_decay = 1 must be below 1"),
    (dict(dense_layers=[0, 1]), r"dense_layers=\[0, 1\] lists all 2 layers: none is left to run Lighthouse"),
    (dict(dense_layers=[0, -1]), r"dense_layers=\[0, -1\] lists all 2 layers"),  # -1 is layer 1
    (dict(dense_layers=[True]), "dense_layers entry True is not a layer index"),
    (dict(lh_pool=3), "the Lighthouse layer at .*lh_pool=3.*: pool must be a power of two"),
    (dict(out_dir=""), "out_dir must be a non-empty name"),
    (dict(short_context_iters=2, short_block_size=500), r"short_block_size \(500\) must divide block_size \(512\) "
                                                        r"and be shorter.*e\.g\. 32 or 64 or 128"),
    (dict(short_context_iters=2, short_block_size=512), r"short_block_size \(512\) must divide"),
    (dict(copy_source="letters"), r"copy_source='letters' plants nothing while copy_passages is 0"),
    (dict(copy_passages=1, copy_length=300), r"copy_length \(300\) must be at most half the shortest training "
                                             r"window \(512\).*lower it to 256"),
    (dict(copy_passages=1, copy_length=100, short_context_iters=2, short_block_size=128), r"window \(128\)"),
])
def test_bad_config_fails_before_training(dataset, overrides, message):
    config = dict(train.DEFAULTS, **TINY, dataset=dataset)
    config.update(overrides)
    with pytest.raises(train.ConfigError, match=message):
        train.validate(config)
        train.check_data(config)


def test_a_dense_layer_listed_twice_leaves_the_others_lighthouse(dataset):
    config = dict(train.DEFAULTS, **TINY, dataset=dataset)
    config.update(n_layer=3, dense_layers=[2, -1])
    train.validate(config)
    assert GPT(GPTConfig.from_settings(dict(config, vocab_size=257))).lighthouse_layers() == [0, 1]


NUMBERS = [key for key, value in train.DEFAULTS.items() if type(value) in (int, float)]


@pytest.mark.parametrize("key", NUMBERS)
def test_every_number_is_range_checked(dataset, key):
    """Every numeric key refuses -1 (and, for a float, inf and nan) with a message that names it.
    (lh_dilation is used, and so checked, only by the dilated scorer.)"""
    config = dict(train.DEFAULTS, **TINY, dataset=dataset, lh_scorer="dilated" if key == "lh_dilation" else "norm")
    bad = [-1] if type(train.DEFAULTS[key]) is int else [-1.0, float("inf"), float("nan")]
    for value in bad:
        with pytest.raises(train.ConfigError, match=key):
            train.validate(dict(config, **{key: value}))


@pytest.mark.parametrize("argv", [["--help"], ["config/quick_cpu.py", "--help"], ["--batch_size=2", "-h"]])
def test_help_anywhere_lists_every_key_with_its_default_and_meaning(argv, capsys):
    assert train.main(argv) is None
    out = capsys.readouterr().out
    assert out.startswith(train.__doc__.strip())
    for key, value in train.DEFAULTS.items():
        shown = f"{value:g}" if type(value) is float else str(value)
        assert re.search(rf"^  --{key}={re.escape(shown)} +{re.escape(train.MEANINGS[key])}$", out, re.M), key
    assert "0 disables clipping" in out and "share the token embedding with the output layer" in out


def test_lighthouse_rules_are_skipped_for_the_dense_baseline(dataset):
    config = dict(train.DEFAULTS, **TINY, dataset=dataset)
    config.update(lh_topk=256, lighthouse_iters=0)
    train.validate(config)  # topk 256 is invalid at 512 tokens, but no layer uses Lighthouse


def test_accumulation_must_split_across_processes(dataset):
    config = dict(train.DEFAULTS, **TINY, dataset=dataset, gradient_accumulation_steps=3)
    with pytest.raises(train.ConfigError, match="multiple of the number of processes"):
        train.validate(config, world_size=2)


def test_config_parsing(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("n_layer = 6\nlearning_rate = 1\n")
    config = train.load_config([str(path), "--n_layer=8", "--dataset=books_bytes", "--dense_layers=[0, 1]"])
    assert config["n_layer"] == 8 and config["learning_rate"] == 1.0 and config["dataset"] == "books_bytes"
    assert config["dense_layers"] == [0, 1]
    with pytest.raises(train.ConfigError, match="unknown config key 'n_layers'.*n_layer"):
        train.load_config(["--n_layers=3"])
    with pytest.raises(train.ConfigError, match="batch_size must be int"):
        train.load_config(["--batch_size=2.5"])
    with pytest.raises(SystemExit, match="config error: unknown config key"):
        train.main(["--lighthouse_itres=3"])


def test_keys_with_a_fixed_set_of_values(tmp_path):
    assert train.load_config(["--lr_schedule=cosine", "--lh_scorer=dilated"])["lh_scorer"] == "dilated"
    compile_values = [train.load_config([f"--compile={v}"])["compile"] for v in ("auto", "True", "False")]
    assert compile_values == ["auto", True, False]
    for arg, message in [("--lr_schedule=linear", "lr_schedule must be one of 'constant', 'cosine'"),
                         ("--init_from=resumed", "init_from must be one of"), ("--lh_rope=after", "lh_rope must be"),
                         ("--compile=1", "compile must be one of 'auto', True, False")]:  # 1 == True, but not a choice
        with pytest.raises(train.ConfigError, match=message):
            train.load_config([arg])
    path = tmp_path / "cfg.py"
    path.write_text("lh_scorer = 'max'\n")
    with pytest.raises(train.ConfigError, match=f"lh_scorer must be one of .*got .max. \\(in {path}\\)"):
        train.load_config([str(path)])


def test_defaults_are_a_valid_run_the_quick_start_one():
    """`python train.py` alone is config/quick_cpu.py's run, written to out/; every model setting is a
    key with GPTConfig's default."""
    train.validate(dict(train.DEFAULTS))
    model_keys = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
    assert model_keys <= set(train.DEFAULTS)  # every model setting is a key, with GPTConfig's default
    assert all(train.DEFAULTS[k] == getattr(GPTConfig(), k) for k in model_keys)
    quick = read_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "quick_cpu.py"))
    differ = {k for k in quick if quick[k] != train.DEFAULTS[k]}
    assert differ == {"out_dir", "device"}
    assert train.DEFAULTS["out_dir"] == "out" and train.DEFAULTS["device"] == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_device_without_a_gpu_is_a_config_error(dataset, tmp_path):
    """--device=cuda on a machine without a GPU: the trainer's own message, not a torch traceback from
    torch.cuda.set_device."""
    with pytest.raises(SystemExit, match="config error: device is cuda but no CUDA GPU is available"):
        train.main([f"--dataset={dataset}", f"--out_dir={tmp_path}", "--device=cuda"])


def test_config_file_with_a_syntax_error_is_named(tmp_path):
    """A config file that does not parse: the message names the file and the error."""
    path = tmp_path / "broken.py"
    path.write_text("n_layer = 4\nlearning_rate = 3e-3 +\n")
    with pytest.raises(SystemExit, match=f"config error: config file {path} could not be read: SyntaxError"):
        train.main([str(path)])


def test_a_bad_setting_writes_nothing(dataset, tmp_path):
    """A bad setting is refused before anything is written: out_dir's metrics.jsonl stays as it was."""
    (tmp_path / "metrics.jsonl").write_text('{"iter": 5}\n')
    with pytest.raises(train.ConfigError, match="eval_iters must be >= 1"):
        run(dataset, tmp_path, eval_iters=0)
    assert os.listdir(tmp_path) == ["metrics.jsonl"] and (tmp_path / "metrics.jsonl").read_text() == '{"iter": 5}\n'


def set_meta(**changes):
    def damage(folder):
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps(dict(meta, **changes)))
    return damage


def append_bytes(name, data):
    def damage(folder):
        with open(folder / name, "ab") as f:
            f.write(data)
    return damage


def put_token(name, token):
    def damage(folder):
        tokens = np.fromfile(folder / name, dtype=np.uint16)
        tokens[100] = token
        tokens.tofile(folder / name)
    return damage


def cut_tokens(name, n):
    def damage(folder):
        tokens = np.fromfile(folder / name, dtype=np.uint16)
        tokens[:-n].tofile(folder / name)
    return damage


@pytest.mark.parametrize("damage, message", [
    (append_bytes("train.bin", b"\x07"), r"train.bin has \d+ bytes, not a whole number of 2-byte tokens"),
    (append_bytes("val.bin", b"\x07"), r"val.bin has \d+ bytes, not a whole number"),
    (append_bytes("meta.json", b"}"), "meta.json is not valid JSON"),
    (put_token("val.bin", 300), "val.bin holds the token id 300, outside meta.json's vocab_size 257"),
    (set_meta(tokenizer="gpt2"), "vocab_size 257 does not match its tokenizer 'gpt2', whose vocab_size is 50257"),
    (set_meta(tokenizer="sentencepiece"), "names the tokenizer 'sentencepiece'; known: bytes, gpt2"),
    (cut_tokens("train.bin", 10), r"train.bin has [\d,]+ tokens, shorter than meta.json says"),
])
def test_bad_data_files_are_named_before_any_work(dataset, tmp_path, damage, message):
    """Damaged or mismatched data files are refused, each with what is wrong, before out_dir is made."""
    folder = tmp_path / "data"
    shutil.copytree(dataset, folder)
    damage(folder)
    with pytest.raises(train.ConfigError, match=message):
        run(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compile_setting(dataset, tmp_path, monkeypatch):
    """compile='auto' is eager on a CPU; True and False force it (torch.compile itself is stubbed out)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **options: compiled.append(model) or model)
    for setting in ("auto", False, True):
        run(dataset, tmp_path / str(setting), compile=setting, lighthouse_iters=0, recovery_iters=1)
    assert len(compiled) == 1 and isinstance(compiled[0], GPT)


def test_sample_from_checkpoint(dataset, tmp_path):
    run(dataset, tmp_path, lighthouse_iters=3, recovery_iters=3)
    texts = sample.main(["--out_dir", str(tmp_path), "--max_new_tokens", "30", "--start", "the ", "--device", "cpu"])
    assert len(texts) == 1 and texts[0].startswith("the ") and len(texts[0]) > 4


def test_data_streams_differ_per_rank_and_resume(dataset):
    config = dict(train.DEFAULTS, **TINY)
    path = os.path.join(dataset, "train.bin")
    rank0, rank1 = (train.Batches(path, config, "cpu", seed=1, rank=r, world_size=2) for r in (0, 1))
    single = train.Batches(path, config, "cpu", seed=1)
    x0, x1 = rank0.next()[0], rank1.next()[0]
    assert not torch.equal(x0, x1)
    # the two ranks' batches are the single process's first two batches: the global stream is the same
    assert torch.equal(x0, single.next()[0]) and torch.equal(x1, single.next()[0])
    state = rank0.generator.get_state()
    after = rank0.next()[0]
    rank0.generator.set_state(state)
    assert torch.equal(rank0.next()[0], after)


def test_ddp_two_processes_match_one_process(dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo) and one micro-step each trains exactly like one process
    with two micro-steps: same batches, same averaged gradients, one metrics file."""
    overrides = {**TINY, "dataset": dataset, "gradient_accumulation_steps": 2, "lighthouse_iters": 2,
                 "recovery_iters": 2}
    args = [f"--{k}={v}" for k, v in overrides.items()] + [f"--out_dir={tmp_path / 'two'}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *args], capture_output=True, text=True, timeout=240,
                            cwd=os.path.dirname(os.path.abspath(__file__)), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    single = run(dataset, tmp_path / "one", gradient_accumulation_steps=2, lighthouse_iters=2, recovery_iters=2)
    two, one = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
    assert sorted(two) == [1, 2, 3, 4]
    for it in two:
        assert abs(two[it] - one[it]) < 1e-5, (it, two[it], one[it])
    final = [r["val_loss"] for r in records(tmp_path / "two") if "val_loss" in r][-1]
    assert abs(final - single["final_val_loss"]) < 1e-5
    # the 2-process checkpoint resumes in one process (2 micro-steps) and goes on like a 1-process run
    # that was never stopped (the schedule is constant after warmup, so only the length differs)
    run(dataset, tmp_path / "two", gradient_accumulation_steps=2, lighthouse_iters=2, recovery_iters=4,
        init_from="resume")
    run(dataset, tmp_path / "straight", gradient_accumulation_steps=2, lighthouse_iters=2, recovery_iters=4)
    two, straight = train_losses(tmp_path / "two"), train_losses(tmp_path / "straight")
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    assert all(abs(two[it] - straight[it]) < 1e-5 for it in (5, 6)), (two, straight)


# python -c code that makes rank 0's own work fail, then runs train.py (its arguments follow)
RANK_0_FAILS = dict(
    download="import prepare_data\nprepare_data.DATA_DIR = sys.argv.pop(1)  # where the default data is missing\n"
             "def prepare(**kwargs):\n    raise prepare_data.DownloadError('no network here (a test)')\n"
             "prepare_data.prepare = prepare\n",
    checkpoint="def save_checkpoint(*args):\n    raise OSError('disk full (a test)')\n"
               "train.save_checkpoint = save_checkpoint\n",
)


@pytest.mark.parametrize("work, message", [("download", "config error: no network here (a test)"),
                                           ("checkpoint", "error: disk full (a test)")])
def test_ddp_a_failure_on_rank_0_ends_every_rank(dataset, tmp_path, work, message):
    """Two processes started as torchrun starts them (gloo; no torchrun, which would kill the other
    rank itself): when work that only rank 0 does fails (the first download, a checkpoint write),
    rank 0 ends with its message and rank 1 stops at once too and says why, neither with a traceback."""
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = {**TINY, "dataset": dataset, "out_dir": tmp_path / "out", "gradient_accumulation_steps": 2}
    args = [f"--{k}={v}" for k, v in overrides.items()]
    if work == "download":
        args = [str(tmp_path / "data"), *args, "--dataset=shakespeare_bytes"]  # the default data, not yet there
    code = "import sys\nimport train\n" + RANK_0_FAILS[work] + "train.main(sys.argv[1:])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              cwd=os.path.dirname(os.path.abspath(__file__)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:  # blocked: the failure did not reach it
                proc.kill()
    assert procs[0].returncode == 1 and message in errors[0] and "Traceback" not in errors[0], errors[0][-3000:]
    assert procs[1].returncode == 1 and "Traceback" not in errors[1], errors[1][-3000:]
    assert errors[1].strip().endswith("error: rank 0 failed (its message says why); rank 1 stops too")


def test_a_checkpoint_that_cannot_be_written_is_named(dataset, tmp_path):
    """torch.save's own error (RuntimeError, here: the temporary file's name is taken by a folder)
    ends the run with a one-line message, as a full disk would."""
    (tmp_path / "ckpt.pt.tmp").mkdir()
    args = [f"--{k}={v}" for k, v in TINY.items()] + [f"--dataset={dataset}", f"--out_dir={tmp_path}"]
    with pytest.raises(SystemExit, match=f"^error: cannot write {tmp_path}/ckpt.pt.tmp: .*Is a directory"):
        train.main(args + ["--lighthouse_iters=0", "--recovery_iters=1"])


def test_the_process_group_is_taken_down_after_an_error(monkeypatch):
    """A process group left standing after an error can keep the process from exiting (NCCL)."""
    calls = []
    monkeypatch.setattr(train, "init_process_group", lambda backend: calls.append(f"init {backend}"))
    monkeypatch.setattr(train, "destroy_process_group", lambda: calls.append("destroy"))
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(OSError, match="disk full"):
        with train.process_group(train.Processes(), "cpu"):
            raise OSError("disk full")
    assert calls == ["init gloo", "destroy"]


def test_one_gpu_index_under_torchrun_is_refused(dataset, tmp_path, monkeypatch):
    """--device=cuda:0 with 2 processes would put both on GPU 0 (faked: a machine with 2 GPUs, rank 1 of 2)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    args = [f"--{k}={v}" for k, v in TINY.items()] + [f"--dataset={dataset}", f"--out_dir={tmp_path}"]
    with pytest.raises(SystemExit, match=r"config error: device=cuda:0 under torchrun would put all 2 processes on "
                                         r"one GPU; use --device=cuda \(or auto\)"):
        train.main(args + ["--gradient_accumulation_steps=2", "--device=cuda:0"])
    assert not os.listdir(tmp_path)


def test_cuda_means_this_processs_gpu_with_its_index(monkeypatch):
    """--device=cuda names GPU 0 alone and the LOCAL_RANK's GPU under torchrun, always with an index:
    torch.cuda.set_device refuses a bare 'cuda' (a one-GPU run with --device=cuda used to stop there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train.choose_device("cuda", train.Processes()) == "cuda:0"
    assert train.choose_device("auto", train.Processes()) == "cuda:0"
    for name, value in dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4").items():
        monkeypatch.setenv(name, value)
    assert train.choose_device("cuda", train.Processes()) == "cuda:1"
    assert train.choose_device("cpu", train.Processes()) == "cpu"


def rank_pid(torchrun_pid, rank):
    """The process id of torchrun's worker with this RANK (Linux: its children, and their environment)."""
    children = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_ddp_ctrl_c_on_one_rank_stops_all_after_the_same_iteration(dataset, tmp_path):
    """Ctrl-C under torchrun: a SIGINT that reaches only rank 1 still stops rank 0 after the same
    iteration (the flag travels with the loss's all_reduce); rank 0 saves that iteration."""
    overrides = {**TINY, "dataset": dataset, "out_dir": tmp_path, "gradient_accumulation_steps": 2,
                 "lighthouse_iters": 0, "recovery_iters": 100000, "ckpt_interval": 0}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *[f"--{k}={v}" for k, v in overrides.items()]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)),
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:  # rank 0's log lines
        lines.append(line)
        if line.startswith("iter 3 (dense)"):
            os.kill(rank_pid(proc.pid, rank=1), signal.SIGINT)
            break
    try:
        output = "".join(lines) + proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:  # hung: on SIGTERM torchrun stops its workers (they run in sessions of their own)
            proc.terminate()
            proc.wait(timeout=60)
    stopped = re.search(r"interrupted at iteration (\d+); checkpoint saved", output)
    assert stopped, output[-3000:]
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["state"]["iter"] == int(stopped.group(1)) >= 3
    assert sorted(train_losses(tmp_path)) == list(range(1, ckpt["state"]["iter"] + 1))


# ----------------------------------------------------------------------------- checkpoints and resuming

@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """A finished TINY run: checkpoints at 5, at the switch (6) and at the end (10)."""
    out_dir = tmp_path_factory.mktemp("finished")
    run(dataset, out_dir)
    return out_dir


def copy_run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "out")
    return tmp_path / "out"


def test_checkpoints_are_plain_data_and_keep_the_one_before(finished):
    ckpt = load_checkpoint(str(finished / "ckpt.pt"))  # weights_only=True
    assert ckpt["state"]["iter"] == 10 and load_checkpoint(str(finished / "ckpt.prev.pt"))["state"]["iter"] == 6
    assert ckpt["model_config"] == dataclasses.asdict(GPTConfig.from_settings(dict(TINY, vocab_size=257)))
    assert ckpt["data_dir"] == os.path.abspath(ckpt["config"]["dataset"]) and ckpt["meta"]["vocab_size"] == 257


def test_a_new_run_never_keeps_another_runs_checkpoint(dataset, finished, tmp_path):
    """A scratch run in an old run's out_dir: the old ckpt.prev.pt must not become this run's fallback."""
    out = copy_run(finished, tmp_path)
    run(dataset, out, lighthouse_iters=0, recovery_iters=2, ckpt_interval=0)  # one checkpoint, at the end
    assert load_checkpoint(str(out / "ckpt.pt"))["state"]["iter"] == 2 and not (out / "ckpt.prev.pt").exists()


def test_resuming_a_finished_run_adds_nothing(dataset, finished, tmp_path, capsys):
    """Resuming a finished run changes no file (no second final record in metrics.jsonl)."""
    out = copy_run(finished, tmp_path)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    summary = run(dataset, out, init_from="resume")
    assert "already finished at iteration 10" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert summary["iter"] == 10 and summary["final_val_loss"] == records(out)[-1]["val_loss"]


def test_a_damaged_checkpoint_falls_back_to_the_one_before(dataset, finished, tmp_path, capsys):
    """A truncated ckpt.pt, and the run resumes exactly from ckpt.prev.pt (the switch's, at 6)."""
    out = copy_run(finished, tmp_path)
    (out / "ckpt.pt").write_bytes((out / "ckpt.pt").read_bytes()[:100000])
    run(dataset, out, init_from="resume")
    assert f"warning: {out}/ckpt.pt is damaged or not a checkpoint (truncated or empty?)" in capsys.readouterr().out
    assert untimed_records(out) == untimed_records(finished)


@pytest.mark.parametrize("damage, reason", [
    (lambda data: data[:len(data) // 2], "truncated or empty"), (lambda data: b"", "truncated or empty"),
    (lambda data: bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)), "not a file written by torch.save"),
], ids=["truncated", "empty", "garbage"])
def test_damaged_checkpoints_are_named(finished, tmp_path, damage, reason):
    """When neither checkpoint can be used, the error names both, and why."""
    out = copy_run(finished, tmp_path)
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        (out / name).write_bytes(damage((out / name).read_bytes()))
    with pytest.raises(train.ConfigError, match=f"(?s)cannot resume from {out}/ckpt.pt or {out}/ckpt.prev.pt:\n"
                                                f"  {out}/ckpt.pt is damaged.*{reason}.*\n"
                                                f"  {out}/ckpt.prev.pt is damaged.*{reason}.*--init_from=scratch"):
        train.load_resume_checkpoint(str(out))


def test_resuming_with_other_model_settings_lists_them(dataset, finished, tmp_path):
    """Each differing model setting is listed, the checkpoint's value against the asked one."""
    out = copy_run(finished, tmp_path)
    with pytest.raises(train.ConfigError, match=r"(?s)holds a model with other settings:\n"
                                                r"  n_embd: 32 in the checkpoint, 64 asked\n"
                                                r"  ffn_hidden: 64 in the checkpoint, 128 asked\n"
                                                r"resume with the settings it was trained with"):
        run(dataset, out, init_from="resume", n_embd=64, ffn_hidden=128)
    # the trainer's own settings may change: two more recovery steps
    run(dataset, out, init_from="resume", recovery_iters=6, activation_checkpointing=True)
    assert sorted(train_losses(out)) == list(range(1, 13))


@pytest.mark.parametrize("change, message", [
    (lambda c: c["model_config"].update(n_experts=4), "model_config has the unknown settings n_experts;"),
    (lambda c: c["model_config"].pop("lh_rope"), "model_config lacks lh_rope;"),
    (lambda c: c.update(model_config=None), "model_config lacks block_size, vocab_size, n_layer"),
    (lambda c: c["model"].pop("norm.weight"), "its weights do not fit its model_config: .*norm.weight"),
    (lambda c: c.pop("meta"), "is not a checkpoint written by this version of train.py"),
], ids=["unknown", "missing", "none", "weights", "no-meta"])
def test_a_checkpoint_of_another_version_is_named(dataset, finished, tmp_path, change, message):
    """A checkpoint that lacks keys, or whose model_config or weights do not fit this model.py: a
    CheckpointError that says so, for the trainer's resume and for GPT.from_checkpoint (sample.py,
    eval_long.py), not a TypeError."""
    out = copy_run(finished, tmp_path)
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        ckpt = load_checkpoint(str(out / name))
        change(ckpt)
        torch.save(ckpt, out / name)
    with pytest.raises(model.CheckpointError, match=f"{out}/ckpt.pt.* {message}"):
        GPT.from_checkpoint(str(out / "ckpt.pt"))
    with pytest.raises(train.ConfigError, match=f"{out}/ckpt.pt.* {message}"):
        run(dataset, out, init_from="resume")


def test_generate_gives_back_the_attention_mode_when_stopped():
    """A Ctrl-C (or any error) while sampling leaves the model in the mode it was in, not dense."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=512, vocab_size=257, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                          ffn_hidden=64, lh_levels=2, lh_pool=4, lh_topk=128))
    model.set_attention("lighthouse")
    calls = []

    def stop_at_the_third_token(module, inputs, output):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    model.lm_head.register_forward_hook(stop_at_the_third_token)
    with pytest.raises(KeyboardInterrupt):
        model.generate(torch.randint(0, 257, (1, 5)), 10)
    assert model.mode == "lighthouse" and [b.attn.use_lighthouse for b in model.blocks] == [True, False]


def test_resuming_with_other_training_settings_lists_them(dataset, finished, tmp_path, capsys):
    """Another data folder, learning rate and batch size are refused, each listed; --allow_changes=True
    lists them as a warning and goes on with them (the optimizer too: its weight decay is this run's)."""
    out = copy_run(finished, tmp_path)
    other_data = shutil.copytree(dataset, tmp_path / "other_data")
    changes = dict(learning_rate=0.05, batch_size=1, weight_decay=0.2)
    listed = (rf"  dataset: '{dataset}' in the checkpoint, '{other_data}' asked\n"
              rf"  batch_size: 2 in the checkpoint, 1 asked\n"
              rf"  learning_rate: 0.01 in the checkpoint, 0.05 asked\n"
              rf"  weight_decay: 0.1 in the checkpoint, 0.2 asked\n")
    with pytest.raises(train.ConfigError, match=f"(?s){out}/ckpt.pt was trained with other settings:\n{listed}"
                                                f"resume with the settings it was trained with, or pass "
                                                f"--allow_changes=True"):
        run(str(other_data), out, init_from="resume", recovery_iters=6, **changes)
    assert untimed_records(out) == untimed_records(finished)  # refused before anything was written
    run(str(other_data), out, init_from="resume", recovery_iters=6, allow_changes=True, **changes)
    assert re.search(f"warning: resuming {out}/ckpt.pt with other settings \\(allow_changes=True\\):\n{listed}",
                     capsys.readouterr().out)
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["state"]["iter"] == 12 and ckpt["config"]["learning_rate"] == 0.05
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.2  # not the checkpoint's 0.1


def test_resuming_may_change_what_is_measured_and_train_on(dataset, finished, tmp_path, capsys):
    """Intervals, eval_iters, the sample, compile, peak_flops, out_dir (the copy) and memory settings
    change nothing in the training; a longer recovery phase trains on (constant schedule)."""
    out = copy_run(finished, tmp_path)
    run(dataset, out, init_from="resume", recovery_iters=6, eval_interval=3, eval_iters=1, log_interval=2,
        ckpt_interval=0, sample_at_end=True, compile=False, peak_flops=1e12, activation_checkpointing=True)
    assert "warning" not in capsys.readouterr().out
    assert load_checkpoint(str(out / "ckpt.pt"))["state"]["iter"] == 12


def test_a_cosine_run_and_its_longer_resume(dataset, tmp_path, capsys):
    """The lr logged with each step is the schedule's: warmup, then cosine down to min_lr in the last
    step. Raising recovery_iters afterwards stretches the decay: the learning rate rises again from
    min_lr. That is a change of schedule, refused unless allowed. Hand-computed: peak 1e-2, min 1e-4,
    warmup 2; at iteration 10 of 12 (0..11) the decay is 8/9 of its way: 1e-4 + 9.9e-3 (1 + cos(8 pi / 9)) / 2."""
    run(dataset, tmp_path, lr_schedule="cosine", min_lr=1e-4)
    lr = {r["iter"]: r["lr"] for r in records(tmp_path) if "lr" in r}  # iteration i is logged as iter i + 1
    assert sorted(lr) == list(range(1, 11))
    assert lr[1] == pytest.approx(5e-3) and lr[2] == lr[3] == pytest.approx(1e-2)
    assert lr[10] == pytest.approx(1e-4)
    assert all(lr[i] > lr[i + 1] for i in range(3, 10))
    run(dataset, tmp_path, init_from="resume", lr_schedule="cosine", min_lr=1e-4)
    assert "and pass --allow_changes=True: the cosine decay then stretches" in capsys.readouterr().out
    with pytest.raises(train.ConfigError, match=r"lighthouse_iters \+ recovery_iters: 10 in the checkpoint, 12 asked: "
                                                r"the cosine decay stretches over the new length, so the learning "
                                                r"rate at iteration 10 is 0.000399, not 0.0001"):
        run(dataset, tmp_path, init_from="resume", lr_schedule="cosine", min_lr=1e-4, recovery_iters=6)
    run(dataset, tmp_path, init_from="resume", lr_schedule="cosine", min_lr=1e-4, recovery_iters=6,
        allow_changes=True)
    assert records(tmp_path)[-2]["lr"] == pytest.approx(1e-4)  # the new last iteration: min_lr again


class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_holding_code_is_refused(dataset, tmp_path):
    """A checkpoint that would run code when unpickled is refused, by the trainer and by sample.py
    (checkpoints are read with weights_only=True), and the code does not run."""
    marker = tmp_path / "code-ran"
    (tmp_path / "out").mkdir()
    torch.save(dict(model={}, model_config={}, config={}, meta={}, evil=RunsCode(str(marker))),
               tmp_path / "out" / "ckpt.pt")
    with pytest.raises(train.ConfigError, match="holds Python objects, not only plain data.*refused"):
        run(dataset, tmp_path / "out", init_from="resume")
    with pytest.raises(SystemExit, match="holds Python objects, not only plain data.*refused"):
        sample.main(["--out_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert not marker.exists()


# ----------------------------------------------------------------------------- Ctrl-C

def ctrl_c_in_iteration(monkeypatch, iteration, times=1):
    """Batches.next sends this process SIGINT, `times` times, as it draws the training batch of `iteration`."""
    calls = {"n": 0}
    original = train.Batches.next

    def next_batch(self, *window):
        if self.path.endswith("train.bin"):
            calls["n"] += 1
            if calls["n"] == iteration:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
        return original(self, *window)

    monkeypatch.setattr(train.Batches, "next", next_batch)


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(dataset, finished, tmp_path, monkeypatch, capsys):
    """Ctrl-C: the iteration in progress finishes, its checkpoint is saved, the run resumes exactly.
    In the last Lighthouse iteration: the switch is due when the run stops, and must not be lost."""
    iteration = 6
    ctrl_c_in_iteration(monkeypatch, iteration)
    handler = signal.getsignal(signal.SIGINT)
    summary = run(dataset, tmp_path)
    assert summary["interrupted"] and summary["iter"] == iteration
    assert signal.getsignal(signal.SIGINT) is handler  # given back
    assert (f"interrupted at iteration {iteration}; checkpoint saved; resume with --init_from=resume"
            in capsys.readouterr().out)
    assert load_checkpoint(str(tmp_path / "ckpt.pt"))["state"]["iter"] == iteration
    monkeypatch.undo()
    run(dataset, tmp_path, init_from="resume")
    assert untimed_records(tmp_path) == untimed_records(finished)  # bitwise the same losses, the same records


def test_ctrl_c_in_the_last_iteration_lets_the_run_finish(dataset, finished, tmp_path, monkeypatch):
    """Stopping there would leave a run that lacks only its final evaluation."""
    ctrl_c_in_iteration(monkeypatch, 10)
    assert not run(dataset, tmp_path)["interrupted"]
    assert untimed_records(tmp_path) == untimed_records(finished)  # with its final evaluation


def test_ctrl_c_exits_130_and_a_second_one_aborts(dataset, tmp_path, monkeypatch, capsys):
    args = [f"--{k}={v}" for k, v in TINY.items()] + [f"--dataset={dataset}"]
    ctrl_c_in_iteration(monkeypatch, 3)
    with pytest.raises(SystemExit) as stopped:
        train.main(args + [f"--out_dir={tmp_path / 'once'}"])
    assert stopped.value.code == 130 and load_checkpoint(str(tmp_path / "once" / "ckpt.pt"))["state"]["iter"] == 3
    ctrl_c_in_iteration(monkeypatch, 3, times=2)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as aborted:
        train.main(args + [f"--out_dir={tmp_path / 'twice'}"])
    assert aborted.value.code == 130 and "aborted" in capsys.readouterr().err
    assert not (tmp_path / "twice" / "ckpt.pt").exists() and signal.getsignal(signal.SIGINT) is handler


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU test; on a GPU, "
                                                      "test_compiled_training_matches_eager_on_a_gpu")
@pytest.mark.parametrize("variant", [dict(), dict(lh_scorer="dilated", lh_rope="span_end", checkpoint_keep_attention=True)],
                         ids=["norm", "dilated-span_end-keep_attention"])
def test_compiled_training_matches_eager(dataset, tmp_path, monkeypatch, variant):
    """torch.compile (the default on CUDA) trains as eager does: the same losses, to rounding,
    through both phases, with activation checkpointing. On a CPU the model would run the reference
    layer; the Triton path, under the interpreter, is what compile meets on a GPU, so it is forced."""
    monkeypatch.setattr(model, "lighthouse_attention", functools.partial(lk.lighthouse_attention, impl="triton"))
    settings = dict(lighthouse_iters=2, recovery_iters=2, eval_interval=100, activation_checkpointing=True, **variant)
    run(dataset, tmp_path / "eager", compile=False, **settings)
    run(dataset, tmp_path / "compiled", compile=True, **settings)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3, 4]
    for it in eager:
        assert compiled[it] == pytest.approx(eager[it], rel=1e-5), (it, eager, compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor, the Triton ops, bf16)")
@pytest.mark.parametrize("variant", [dict(), dict(lh_scorer="dilated", lh_rope="span_end", checkpoint_keep_attention=True),
                                     dict(lh_selection="causal")],
                         ids=["norm", "dilated-span_end-keep_attention", "causal"])
def test_compiled_training_matches_eager_on_a_gpu(dataset, tmp_path, variant):
    """What the CPU test above cannot check: Inductor's code around the registered Triton ops,
    under bf16 autocast, trains as eager does, through both phases (cuDNN's backward is not
    deterministic, so the losses agree to bf16 rounding, not bit for bit)."""
    settings = dict(device="cuda", lighthouse_iters=3, recovery_iters=3, eval_interval=100,
                    activation_checkpointing=True, **variant)
    run(dataset, tmp_path / "eager", compile=False, **settings)
    run(dataset, tmp_path / "compiled", compile=True, **settings)
    eager, compiled = train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")
    assert sorted(compiled) == list(range(1, 7))
    for it in eager:
        assert compiled[it] == pytest.approx(eager[it], rel=2e-2), (it, eager, compiled)
