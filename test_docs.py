"""
The commands README.md, docs/*.md and the config headers show run as written: every train.py
command is a valid fresh run of a dataset that one of the README's own prepare_data.py commands
creates, and every other script's command gets through that script's argument parser. Nothing is
trained or prepared: this only reads the commands.
"""

import argparse
import glob
import os
import re
import shlex
import sys

import pytest
import torch

import bench
import compare_arms
import eval_long
import plot_runs
import prepare_data
import probe_lookahead
import sample
import train

ROOT = os.path.dirname(os.path.abspath(__file__))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "config", "*.py")))
SCRIPTS = dict(train=train, sample=sample, prepare_data=prepare_data, eval_long=eval_long, compare_arms=compare_arms,
               plot_runs=plot_runs, bench=bench, probe_lookahead=probe_lookahead)
# a script's command: `python X.py ...` or `torchrun <its options> X.py ...`, up to a comment or the end
COMMAND = re.compile(r"(?:python|torchrun(?: --?[\w-]+(?:=\S+)?)*) (\w+)\.py((?: [^\s#]+)*)")


def commands(path):
    """(script, argv) of every command in a markdown file's code (fenced blocks and `inline` code,
    which may run over a line break) or in a config file's comments. A shell variable such as $S
    (the seed of a loop over seeds) is given the value 0."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    if path.endswith(".py"):
        pieces = [line.lstrip("# ") for line in text.splitlines() if line.startswith("#")]
    else:
        fenced = r"^ *```[^\n]*\n(.*?)^ *```"  # (indented inside a list item, too)
        blocks = re.findall(fenced, text, flags=re.M | re.S)
        text = re.sub(fenced, "", text, flags=re.M | re.S)
        pieces = [line for block in blocks for line in block.splitlines()]
        pieces += [code.replace("\n", " ") for code in re.findall(r"`([^`]+)`", text)]
    found = []
    for piece in pieces:
        for script, args in COMMAND.findall(re.sub(r"\$\w+", "0", piece)):
            if script in SCRIPTS:
                found.append((script, shlex.split(args)))
    return found


ALL = [(path, script, argv) for path in DOCS + CONFIGS for script, argv in commands(path)]


def prepared_datasets(path="README.md"):
    """The data folders the prepare_data.py commands of the README and of the document at path
    create (--out_dir data/X), and the default corpus, which train.py prepares on first use."""
    created = {"shakespeare_bytes"}
    for script, argv in [*commands("README.md"), *commands(path)]:
        if script == "prepare_data" and "--out_dir" in argv:
            out_dir = argv[argv.index("--out_dir") + 1]
            assert out_dir.startswith("data/"), f"README: prepare into data/, where train.py looks ({out_dir})"
            created.add(out_dir.removeprefix("data/"))
    return created


def test_the_docs_show_commands_of_every_kind():
    """The extraction finds what the README shows (if it found nothing, every test below would pass)."""
    scripts = {script for _, script, _ in ALL}
    assert {"train", "sample", "prepare_data", "eval_long", "compare_arms", "bench"} <= scripts
    assert len([1 for path, script, _ in ALL if path == "README.md" and script == "train"]) >= 6
    assert ("train", ["config/paper_98k.py"]) in commands("README.md")  # after torchrun's options


TRAIN = [(path, argv) for path, script, argv in ALL if script == "train" and argv != ["--help"]]


def command_id(value):
    return " ".join(value) if isinstance(value, list) else value


@pytest.mark.parametrize("path, argv", TRAIN, ids=command_id)
def test_train_commands_are_valid_runs_of_prepared_data(path, argv, monkeypatch):
    """Each is parsed by train.py's own loader and checked as a fresh run on this machine would be
    (a resume needs its checkpoint, so it is checked as a fresh run; a context-parallel one needs
    GPUs, so it is checked as on a machine with context_parallel of them), and its dataset is a
    folder the README's prepare commands make."""
    config = train.load_config(argv)
    cp = config["context_parallel"]
    if cp > 1:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train.validate(dict(config, init_from="scratch", device="cpu" if cp == 1 else "cuda"), world_size=cp)
    assert config["dataset"] in prepared_datasets(path), (
        f"{path}: `{' '.join(['train.py', *argv])}` trains on data/{config['dataset']}, which no prepare_data.py "
        f"command of the README or of {path} creates ({', '.join(sorted(prepared_datasets(path)))})")


class Parsed(Exception):
    """Raised where a script would start working: its arguments were accepted."""


@pytest.mark.parametrize("path, script, argv", [c for c in ALL if c[1] != "train"],
                         ids=command_id)
def test_other_commands_get_through_their_argument_parser(path, script, argv, monkeypatch):
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])  # for bench.py, which reads sys.argv
    main = SCRIPTS[script].main
    with pytest.raises(Parsed):
        main(argv) if main.__code__.co_argcount else main()


def test_the_data_docs_agree_with_the_manifest():
    """docs/data.md's table: books, authors (author folders) and characters per split, as the manifest counts them."""
    rows = prepare_data.read_manifest(prepare_data.BOOKS_MANIFEST)
    text = open(os.path.join(ROOT, "docs", "data.md"), encoding="utf-8").read()
    for split in ("train", "val"):
        books = [r for r in rows if r["split"] == split]
        authors = {r["source_path"].split("/")[0] for r in books}
        characters = sum(int(r["characters"]) for r in books)
        assert re.search(rf"^\| {split} \|[^\n]*\| {len(books)} \| {len(authors)} \| {characters:,} \|", text, re.M)


def test_the_files_the_docs_cite_are_in_the_repo():
    """Every assets/ file (or glob) that README.md, docs/*.md or a config header cites as the record
    of a measurement exists."""
    for path in DOCS + CONFIGS:
        text = open(os.path.join(ROOT, path), encoding="utf-8").read()
        for cited in re.findall(r"assets/[\w./*-]*[\w/*]", text):
            assert glob.glob(os.path.join(ROOT, cited)), f"{path} cites {cited}, which is not in the repo"


def test_the_quick_start_numbers_name_their_machine_and_agree():
    """The quick start's losses depend on the CPU: the README and config/quick_cpu.py say which
    machine printed them, and quote the same ones."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    header = " ".join(line.lstrip("# ") for line in open(os.path.join(ROOT, "config", "quick_cpu.py"))
                      if line.startswith("#"))
    header = " ".join(header.split())  # one line
    expected = readme[readme.index("## Quick start"):readme.index("## How Lighthouse works")]
    for text in (expected, header):
        assert "Intel Xeon" in text and "model 207" in text and "other CPUs" in text
    final, at_switch = "final val loss (dense) 1.9864", "iter 240: val loss (dense) 2.2961, lighthouse-mode (reads ahead) 1.9884"
    assert final in expected and at_switch in expected
    assert "final dense val loss 1.9864" in header and "2.2961, 1.9884 in Lighthouse mode" in header
