"""
Tests of probe_lookahead.py, the look-ahead measurement: it must see the gain of a model that
reads ahead, and find exactly none in dense mode and with the causal selection.

    python -m pytest -q test_probe_lookahead.py
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import probe_lookahead
from model import GPT, GPTConfig

# Two tiles of 1024 tokens (topk 256: 2 tiles, each keeping 128 of its 256 coarsest entries of 4 tokens),
# every layer Lighthouse.
TINY = dict(block_size=2048, vocab_size=257, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64,
            dense_layers=[], lh_levels=2, lh_pool=4, lh_topk=256)


def inputs(config, windows=2, positions=6):
    """Windows, foreign windows and positions from random tokens, as probe() draws them from val.bin."""
    tokens = np.random.default_rng(0).integers(0, 256, 20 * config.block_size).astype(np.uint16)
    ds = probe_lookahead.distances(config)
    return probe_lookahead.sample(tokens, config.block_size, windows, positions, ds[-1], seed=0), ds


class ReadsTheNextToken(torch.nn.Module):
    """A model built to read ahead: in Lighthouse mode its prediction at t is the input at t+1 (the
    token it is asked to predict); in dense mode, the input at t, which is causal."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.mode = vocab_size, "dense"

    def set_attention(self, mode):
        self.mode = mode

    def forward(self, idx):
        source = torch.cat([idx[:, 1:], idx[:, -1:]], dim=1) if self.mode == "lighthouse" else idx
        return F.one_hot(source, self.vocab_size).float() * 10, None  # (B, N, vocab) logits


def test_distances_follow_the_model():
    assert probe_lookahead.distances(GPTConfig(**TINY)) == [0, 1, 3, 1024]
    big = GPTConfig(**dict(TINY, block_size=65536, lh_levels=3, lh_topk=2048))
    assert probe_lookahead.distances(big) == [0, 1, 3, 15, 4096]  # 16 tiles of 4096 tokens


def test_a_model_that_reads_the_next_token_shows_its_gain():
    config = GPTConfig(**TINY)
    (windows, foreign, positions), ds = inputs(config)
    model = ReadsTheNextToken(config.vocab_size)
    true, gain = probe_lookahead.measure(model, "lighthouse", windows, foreign, positions, ds)
    assert true.max() < 0.02  # it sees its target...
    same = windows[:, 1:].gather(1, positions) == foreign[:, 1:].gather(1, positions)  # where the copy has it too
    assert (gain[0][~same.flatten()] > 9).all()  # ...and loses it when the next token is replaced
    assert all((gain[d] == 0).all() for d in ds[1:])  # it reads nothing beyond t+1
    true, gain = probe_lookahead.measure(model, "dense", windows, foreign, positions, ds)
    assert all((g == 0).all() for g in gain.values()) and model.mode == "dense"


@pytest.mark.parametrize("selection", ["paper", "causal"])
def test_only_the_papers_selection_lets_a_model_read_ahead(selection):
    """A real GPT, untrained: with the paper's selection later inputs move its Lighthouse-mode
    predictions (training then learns to use that); with the causal one nothing moves, as in dense mode."""
    torch.manual_seed(0)
    config = GPTConfig(**TINY, lh_selection=selection)
    model = GPT(config).eval()
    (windows, foreign, positions), ds = inputs(config)
    _, gain = probe_lookahead.measure(model, "dense", windows, foreign, positions, ds)
    assert all((g == 0).all() for g in gain.values())
    _, gain = probe_lookahead.measure(model, "lighthouse", windows, foreign, positions, ds)
    if selection == "causal":
        assert all((g == 0).all() for g in gain.values())
    else:
        assert (gain[0] != 0).any() and (gain[ds[-1]] == 0).all()  # inside the tile only
