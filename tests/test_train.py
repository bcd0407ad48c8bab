"""examples/train.py, in tiny runs (a few batches): every model and optimizer trains, files are written, and bad
input fails with a clear message before anything is trained or overwritten."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import train  # noqa: E402

try:
    import torchvision  # noqa: F401
    HAS_TORCHVISION = True
except Exception:
    HAS_TORCHVISION = False

TINY = ["--num_epochs", "3", "--max-batches", "6", "--batch_size", "32"]


def run(tmp_path, *args):
    return train.main([*TINY, "--out", str(tmp_path / "out"), *args])


@pytest.mark.parametrize("optimizer", train.OPTIMIZERS)
@pytest.mark.parametrize("model", [
    "cnn", "mlp", pytest.param("resnet18", marks=pytest.mark.skipif(not HAS_TORCHVISION, reason="no torchvision"))])
def test_each_model_and_optimizer_learns_and_writes_files(tmp_path, model, optimizer):
    (history,) = run(tmp_path, "--model", model, "--optimizer", optimizer).values()
    if model == "resnet18":  # 18 steps of a batch-norm ResNet at lr 0.05 need not go down (seen once)
        assert all(math.isfinite(h["train_loss"]) for h in history)
    else:
        assert history[-1]["train_loss"] < history[0]["train_loss"]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "metrics.json", "curves.png"}
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert json.loads((out / "metrics.json").read_text())["history"][optimizer][-1]["epoch"] == 3


def test_compare_fusednag_matches_torch_nesterov(tmp_path):
    histories = run(tmp_path, "--compare")
    assert list(histories) == ["sgd", "sgd-momentum", "sgd-nesterov", "fusednag"]
    for ours, theirs in zip(histories["fusednag"], histories["sgd-nesterov"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert ours[key] == theirs[key], key  # bit-identical fp32 math, same seed and data order
    table = (tmp_path / "out" / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in train.OPTIMIZERS)


def test_refuses_to_overwrite(tmp_path, capsys):
    run(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path)
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    run(tmp_path, "--overwrite")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_use_cuda_without_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--use_cuda")
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    run(tmp_path, "--device", "auto")  # falls back, with a warning
    assert "warning: CUDA is not available" in capsys.readouterr().err


def test_missing_mnist_names_the_files(tmp_path):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"))
    assert all(name in str(exc.value.code) for name in train.MNIST_FILES)


@pytest.mark.parametrize("bad", [["--optimizer", "adam"], ["--num_epochs", "0"], ["--no-such-flag"]])
def test_bad_flags_are_argparse_errors(tmp_path, bad):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, *bad)
    assert exc.value.code == 2


def test_multi_gpu_runs_two_gloo_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train.py"), "--multi_gpu", "--num_epochs", "2", "--max-batches", "4",
         "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "metrics.json").read_text())
    assert meta["processes"] == 2 and meta["device"] == "cpu"
    assert "starting 2 processes" in result.stdout
