"""
Tests of eval_long.py on a tiny model, on random-byte data and on an oracle that copies perfectly (CPU, fast).
"""

import dataclasses
import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch

import eval_long
from model import GPT, GPTConfig

N = 2048
TINY = GPTConfig(block_size=N, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64)
FAST = ["--windows", "2", "--trials", "2", "--passage", "128", "--batch", "2", "--device", "cpu"]
UNIFORM = math.log(257)  # the loss of a model that knows nothing about the next byte


class CopyOracle(torch.nn.Module):
    """A perfect induction head: at each position it predicts the token that followed the most recent
    earlier occurrence of the last k tokens (no more than reach tokens back, if given), and spreads its
    bets evenly where they never occurred."""

    def __init__(self, k=3, reach=None, vocab_size=257):
        super().__init__()
        self.k, self.reach, self.vocab_size = k, reach, vocab_size

    def forward(self, idx):
        B, T = idx.shape
        equal = idx[:, :, None] == idx[:, None, :]  # (B, T, T): token t equals token j
        match = equal.clone()
        for i in range(1, self.k):  # ... and so do the tokens i before them
            match[:, i:, i:] &= equal[:, :-i, :-i]
            match[:, :i, :] = False
            match[:, :, :i] = False
        match &= torch.ones(T, T, dtype=torch.bool).tril(-1)  # only earlier occurrences j < t
        if self.reach is not None:
            match &= torch.ones(T, T, dtype=torch.bool).triu(-self.reach)  # ... and t - j <= reach
        last = torch.where(match, torch.arange(T), -1).max(-1).values  # (B, T): the most recent, or -1
        found = last >= 0
        predicted = idx.gather(1, (last + 1).clamp(max=T - 1))  # (B, T): the token after it
        logits = torch.zeros(B, T, self.vocab_size)
        logits.scatter_(2, predicted[..., None], 30.0 * found[..., None].float())  # near-certain where found
        return logits, None


def random_bytes(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).astype(np.uint16)


def write_checkpoint(path, data_dir, tokenizer="bytes", config=TINY):
    torch.manual_seed(0)
    model = GPT(config)
    meta = dict(tokenizer=tokenizer, vocab_size=257, eot_id=256)
    torch.save(dict(model=model.state_dict(), model_config=dataclasses.asdict(config), config=dict(seed=7), meta=meta,
                    data_dir=str(data_dir)), path)
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder with val.bin (20000 random bytes) and a checkpoint of an untrained tiny model."""
    folder = tmp_path_factory.mktemp("eval")
    random_bytes(20000).tofile(folder / "val.bin")
    write_checkpoint(folder / "ckpt.pt", folder)
    return folder


def run(*argv):
    return eval_long.main([str(a) for a in argv])


def test_results_layout(run_dir, tmp_path):
    results = run(run_dir / "ckpt.pt", *FAST, "--out", tmp_path / "r.json")
    assert json.load(open(tmp_path / "r.json")) == results
    if importlib.util.find_spec("matplotlib"):  # optional: without it the plot is skipped with a note
        assert (tmp_path / "r.png").stat().st_size > 0  # the plot, named after --out
    assert results["settings"] == dict(windows=2, trials=2, passage=128, letters=False, prefix=128, batch=2, seed=0,
                                       device="cpu", dtype="float32")
    assert results["data"] is None  # each checkpoint's own val.bin
    [entry] = results["checkpoints"]
    assert entry["data"] == str(run_dir / "val.bin") and entry["data_tokens"] == 20000
    assert entry["block_size"] == N and entry["tokenizer"] == "bytes"
    assert entry["train_seed"] == 7  # the seed in the checkpoint's training config
    pos, ctx, copy = entry["position"], entry["context"], entry["copy"]
    assert pos["bins"] == [[0, 64], [64, 128], [128, 256], [256, 512], [512, 1024], [1024, 2048]]
    assert len(pos["loss"]) == len(pos["bits_per_byte"]) == 6
    assert ctx["tail"] == 1024 and ctx["contexts"] == [1024]
    assert len(ctx["loss"]) == len(ctx["gain"]) == len(ctx["gain_stderr"]) == 1
    assert copy["distances"] == [256, 512, 1024, 1792]  # 1792 = N - 128 - passage: the largest that fits
    for key in ("loss_first", "loss_second", "gain", "gain_stderr", "accuracy_first", "accuracy_second"):
        assert len(copy[key]) == 4
    # an untrained model knows nothing anywhere
    losses = pos["loss"] + [pos["loss_all"], ctx["loss_full"]] + ctx["loss"] + copy["loss_first"] + copy["loss_second"]
    assert all(abs(x - UNIFORM) < 0.05 for x in losses)


def test_same_inputs_give_the_same_json(run_dir, tmp_path):
    for name in ("a.json", "b.json"):
        run(run_dir / "ckpt.pt", *FAST, "--out", tmp_path / name, "--plot", tmp_path / "p.png")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    run(run_dir / "ckpt.pt", *FAST, "--seed", "1", "--out", tmp_path / "c.json", "--plot", tmp_path / "p.png")
    a, c = (json.load(open(tmp_path / name))["checkpoints"][0] for name in ("a.json", "c.json"))
    assert a["position"]["loss"] != c["position"]["loss"]  # the seed picks the windows...
    assert a["copy"]["loss_first"] != c["copy"]["loss_first"]  # ... and the copy trials


def test_bits_per_byte_only_for_bytes(run_dir, tmp_path):
    # the same model under a GPT-2 meta: its tokens are not bytes, so there are no bits per byte
    gpt2 = write_checkpoint(tmp_path / "gpt2.pt", run_dir, tokenizer="gpt2")
    results = run(run_dir / "ckpt.pt", gpt2, *FAST, "--data", run_dir / "val.bin", "--out", tmp_path / "r.json")
    assert results["data"] == str(run_dir / "val.bin")
    byte_level, other = results["checkpoints"]
    # an untrained model knows nothing about random bytes: it needs about log2(257) = 8.006 bits for each,
    # where its loss is ln(257) = 5.549 nats
    assert all(abs(b - math.log2(257)) < 0.08 for b in byte_level["position"]["bits_per_byte"])
    assert other["position"]["bits_per_byte"] is None
    assert other["position"]["loss"] == byte_level["position"]["loss"]  # same model, same data, same windows


def test_oracle_copies_at_every_distance():
    data = random_bytes(20000)
    copy = eval_long.evaluate(CopyOracle(), data, N, windows=1, trials=4, passage=128, batch=2)["copy"]
    assert copy["distances"] == [256, 512, 1024, 1792]
    for d in range(4):
        # the first copy is new text: nothing to copy from
        assert copy["loss_first"][d] == pytest.approx(UNIFORM, abs=0.05) and copy["accuracy_first"][d] < 0.05
        # the second: all but the k - 1 = 2 tokens before the oracle has seen k tokens of the passage
        assert copy["loss_second"][d] < 0.1 and copy["accuracy_second"][d] > 0.98
        assert copy["gain"][d] > 5


def test_letters_as_the_passage():
    """letters: every trial's passage is random letters, planted at PREFIX and D later; the oracle
    recalls the second copy; chance (ln 26) is reported. (The oracle is not told the alphabet, so
    its first copy stays at its uniform loss.)"""
    inputs = []

    class Recording(CopyOracle):
        def forward(self, idx):
            inputs.append(idx.clone())
            return super().forward(idx)

    letters = list(range(ord("a"), ord("z") + 1))
    # k = 6: with 26 letters, shorter runs recur by chance within 256 letters, and a wrong near-certain guess costs 30
    copy = eval_long.evaluate(Recording(k=6), random_bytes(20000), N, windows=1, trials=4, passage=128, batch=2,
                              letters=letters)["copy"]
    assert copy["source"] == "letters" and copy["chance"] == pytest.approx(math.log(26))
    # the model reads each probe but its last token: (2, 128 + D + 128 - 1)
    probes = [x for x in inputs if x.shape[1] in (128 + D + 127 for D in (256, 512, 1024))]
    assert len(probes) == 3 * 2  # three distances (the fourth is as long as the windows) in batches of 2
    for x in probes:
        D = x.shape[1] - 255
        assert all(token in letters for token in x[:, 128:256].flatten().tolist())
        assert torch.equal(x[:, 128:255], x[:, 128 + D:])  # the same passage D later
        assert not torch.equal(x[0, 128:256], x[1, 128:256])  # each trial its own
    # the second copy: all but the k - 1 = 5 tokens before the oracle has seen 6 letters of it
    assert all(loss < 0.25 for loss in copy["loss_second"]) and all(a > 0.95 for a in copy["accuracy_second"])
    assert all(loss == pytest.approx(UNIFORM, abs=0.05) for loss in copy["loss_first"])
    assert eval_long.evaluate(CopyOracle(), random_bytes(20000), N, windows=1, trials=2, passage=128,
                              batch=2)["copy"]["chance"] is None  # text passages: no chance level


def test_oracle_that_sees_700_tokens_back_copies_only_within_them():
    # D is the real distance: the second copy is found 256 and 512 tokens back, not 1024 or 1792 back
    data = random_bytes(20000)
    copy = eval_long.evaluate(CopyOracle(reach=700), data, N, windows=1, trials=4, passage=128, batch=2)["copy"]
    assert [g > 5 for g in copy["gain"]] == [True, True, False, False]
    assert copy["gain"][2:] == pytest.approx([0, 0], abs=0.05)


def test_untrained_model_does_not_copy():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    copy = eval_long.evaluate(model, random_bytes(20000), N, windows=1, trials=4, passage=128, batch=2)["copy"]
    assert all(abs(g) < 0.01 for g in copy["gain"])
    assert all(a < 0.05 for a in copy["accuracy_second"])


@pytest.mark.parametrize("n, period", [(2048, 1500), (512, 300)])
def test_oracle_on_text_that_repeats(n, period):
    # The oracle knows the token after position t exactly when t >= period + k - 1 (the k tokens ending
    # at t occurred one period back), and nothing before. The far-context measurement scores the last
    # T = min(1024, n / 2) positions: with the whole window the oracle knows all of them from
    # period + 3 on, so their loss is UNIFORM * (period + 3 - (n - T)) / T; with only the last T
    # tokens, which hold no repeat, it is UNIFORM. k = 4: a 3-gram repeats by chance in about 1 in 15
    # periods of 1500 random bytes (the one here does), and a k = 3 oracle would copy the wrong token.
    tail = min(1024, n // 2)
    data = np.tile(random_bytes(period, seed=1), 40000 // period)
    result = eval_long.evaluate(CopyOracle(k=4), data, n, windows=2, trials=1, passage=64, batch=2)
    pos, ctx = result["position"], result["context"]
    assert ctx["tail"] == tail and ctx["contexts"] == [tail]
    known_from = [i for i, (lo, hi) in enumerate(pos["bins"]) if hi > period + 3][0]
    assert pos["loss"][:known_from] == pytest.approx([UNIFORM] * known_from, abs=1e-3)  # bins before the repeat
    full = UNIFORM * (period + 3 - (n - tail)) / tail
    assert ctx["loss_full"] == pytest.approx(full, abs=1e-3)
    assert ctx["loss"] == pytest.approx([UNIFORM], abs=1e-3)
    assert ctx["gain"] == pytest.approx([UNIFORM - full], abs=1e-3)


def test_a_short_window_reports_the_tail_it_scores(tmp_path, capsys):
    """At block_size 512 the far-context part scores the last 256 tokens, and says so."""
    folder = tmp_path / "short"
    folder.mkdir()
    random_bytes(20000).tofile(folder / "val.bin")
    write_checkpoint(folder / "ckpt.pt", folder, config=dataclasses.replace(TINY, block_size=512))
    [entry] = run(folder / "ckpt.pt", *FAST, "--out", tmp_path / "r.json")["checkpoints"]
    assert entry["context"]["tail"] == 256 and entry["context"]["contexts"] == [256]
    out = capsys.readouterr().out
    assert "loss of the last 256 tokens: " in out and "after the last    256 tokens: " in out
    assert "1024" not in out


def test_distances_bins_and_contexts_at_64k():
    assert eval_long.copy_distances(65536, 256) == [2 ** e for e in range(8, 16)] + [65536 - 128 - 256]
    assert eval_long.copy_distances(2048, 512) == [512, 1024, 1408]  # never closer than the passage is long
    assert eval_long.position_bins(65536)[-2:] == [(16384, 32768), (32768, 65536)]
    assert eval_long.context_lengths(65536) == [1024, 4096, 16384]


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    eval_long.plot([], tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()
    assert capsys.readouterr().out.startswith("matplotlib is not installed")


@pytest.mark.parametrize("case, message", [
    ("missing checkpoint", "not found"),
    ("short data", "needs at least N + 2 * passage"),
    ("foreign tokens", "outside the model's vocabulary"),
    ("large passage", "lower --passage"),
])
def test_clear_errors(run_dir, tmp_path, case, message):
    ckpt, data, extra = run_dir / "ckpt.pt", run_dir / "val.bin", []
    if case == "missing checkpoint":
        ckpt = tmp_path / "nothing.pt"
    elif case == "short data":
        data = tmp_path / "short.bin"
        random_bytes(N + 100).tofile(data)
    elif case == "foreign tokens":
        data = tmp_path / "gpt2.bin"
        np.full(20000, 50256, dtype=np.uint16).tofile(data)
    else:
        extra = ["--passage", "1700"]
    with pytest.raises(SystemExit) as e:
        run(ckpt, "--data", data, "--out", tmp_path / "r.json", *extra)
    assert message in str(e.value) and str(e.value).startswith("error:")
