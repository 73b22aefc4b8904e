"""
Tests of model.py, train.py and sample.py on a tiny model and tiny synthetic data (CPU, fast).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train
from model import GPT, GPTConfig

TINY = dict(
    block_size=512, batch_size=2, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64,
    lh_levels=2, lh_pool=4, lh_topk=128, dense_layers=[-1], lighthouse_iters=6, recovery_iters=4,
    learning_rate=1e-2, warmup_iters=2, eval_interval=5, eval_iters=2, log_interval=1, ckpt_interval=5,
    sample_at_end=False, device="cpu",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A byte-level dataset whose text repeats, so a tiny model learns it in a few steps."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    words = [b"the ", b"light ", b"house ", b"keeps ", b"watch ", b"over ", b"sea ", b"\n"]
    text = b"".join(words[i] for i in rng.integers(0, len(words), 20000))
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    tokens[:-10000].tofile(folder / "train.bin")
    tokens[-10000:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps(dict(tokenizer="bytes", vocab_size=257, eot_id=256)))
    return str(folder)


def run(dataset, out_dir, **overrides):
    config = dict(train.DEFAULTS, **TINY, dataset=dataset, out_dir=str(out_dir))
    config.update(overrides)
    return train.train(config)


def records(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


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


def test_dense_baseline_has_no_lighthouse_phase(dataset, tmp_path):
    run(dataset, tmp_path, lighthouse_iters=0, recovery_iters=3, eval_interval=100)
    assert {r["phase"] for r in records(tmp_path)} == {"dense"}


@pytest.mark.parametrize("killed_at", [8, 10])
def test_resume_after_a_kill_continues_exactly(dataset, tmp_path, monkeypatch, killed_at):
    # evals every 3 iterations: one falls on the switch (after 6), whose checkpoint a kill in
    # iteration 8 resumes from; a kill in iteration 10 resumes from the periodic one after 9
    settings = dict(eval_interval=3, ckpt_interval=3)
    run(dataset, tmp_path / "whole", **settings)
    expected = train_losses(tmp_path / "whole")
    expected_evals = [(r["iter"], r["val_loss"]) for r in records(tmp_path / "whole") if "val_loss" in r]

    calls = {"n": 0}
    original = train.Batches.next

    def dies(self):
        if self.path.endswith("train.bin"):
            calls["n"] += 1
            if calls["n"] == killed_at:
                raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(train.Batches, "next", dies)
    with pytest.raises(KeyboardInterrupt):
        run(dataset, tmp_path / "killed", **settings)
    monkeypatch.setattr(train.Batches, "next", original)
    run(dataset, tmp_path / "killed", init_from="resume", **settings)
    assert train_losses(tmp_path / "killed") == expected  # bitwise the same losses, every iteration
    iters = [r["iter"] for r in records(tmp_path / "killed") if "train_loss" in r]
    assert iters == sorted(iters) and len(iters) == 10  # no duplicated records after the resume
    evals = [(r["iter"], r["val_loss"]) for r in records(tmp_path / "killed") if "val_loss" in r]
    assert evals == expected_evals


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
    # two Lighthouse layers attend over M = 512/4 + 4*128 = 640 entries instead of 512 tokens
    extra = 2 * 3 * 2 * (640**2 - 512**2) * 2 * 16 / 512
    assert model.flops_per_token("lighthouse") - model.flops_per_token("dense") == pytest.approx(extra)


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
    (dict(lr_schedule="linear"), "lr_schedule must be"),
    (dict(lighthouse_iters=0, recovery_iters=0), "nothing to train"),
    (dict(dataset="/nonexistent/folder"), "train.bin not found"),
    (dict(init_from="resume", out_dir="/nonexistent/out"), "ckpt.pt does not exist"),
])
def test_bad_config_fails_before_training(dataset, overrides, message):
    config = dict(train.DEFAULTS, **TINY, dataset=dataset)
    config.update(overrides)
    with pytest.raises(train.ConfigError, match=message):
        train.validate(config)
        train.check_data(config)


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


def test_lookahead_probe_sees_the_leak_only_where_it_can_be(dataset, tmp_path):
    """probe_lookahead.py: changing the future moves Lighthouse predictions only inside the cut's
    tile; dense predictions, and Lighthouse ones in the tile before, do not move at all."""
    import probe_lookahead
    run(dataset, tmp_path, block_size=4096, lh_topk=512, batch_size=1, lighthouse_iters=1, recovery_iters=0)
    diffs = probe_lookahead.probe(str(tmp_path / "ckpt.pt"), windows=2, device="cpu")["diffs"]
    assert all(d == 0 for d in diffs["dense"]["in_tile"] + diffs["dense"]["tile_before"])
    assert all(d == 0 for d in diffs["lighthouse"]["tile_before"])
    assert any(d != 0 for d in diffs["lighthouse"]["in_tile"])
