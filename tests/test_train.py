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
    assert list(histories) == ["sgd", "sgd-momentum", "sgd-nesterov", "fusednag", "sgd-nesterov-foreach",
                               "sgd-nesterov-fused"]
    for ours, theirs in zip(histories["fusednag"], histories["sgd-nesterov"], strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert ours[key] == theirs[key], key  # bit-identical fp32 math, same seed and data order
    table = (tmp_path / "out" / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in train.OPTIMIZERS) and "share in step()" in table
    assert all(0 < row["step_seconds"] < row["seconds"] for rows in histories.values() for row in rows)


def test_several_seeds_give_mean_and_range(tmp_path):
    histories = run(tmp_path, "--compare", "--seeds", "0", "1", "--num_epochs", "2")
    for rows in histories.values():
        assert [(r["seed"], r["epoch"]) for r in rows] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "seeds 0, 1" in table and "–" in table  # mean (min–max)
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0


def test_compare_a_subset(tmp_path, capsys):
    histories = run(tmp_path, "--compare", "fusednag", "sgd-nesterov-fused", "fusednag", "--num_epochs", "1")
    assert list(histories) == ["fusednag", "sgd-nesterov-fused"]
    assert "| sgd |" not in (tmp_path / "out" / "compare.md").read_text()
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--compare", "adam")
    assert exc.value.code == 2 and "invalid choice: 'adam'" in capsys.readouterr().err


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


# --- the article's command line ---------------------------------------------------------------------------------------

ARTICLE = ["--model", "cnn", "--num_epochs", "1", "--learning_rate", "0.01", "--Momentum", "0.9", "--use_cuda", "False",
           "--batch_size", "64", "--multi_gpu", "False"]


def test_articles_longest_command_runs_as_written(tmp_path):
    args = [*ARTICLE, "--image_size", "12", "--train_only", "False", "--max-batches", "3", "--out", str(tmp_path / "o")]
    (history,) = train.main(args).values()
    assert history[0]["test_acc"] is not None
    meta = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert meta["args"]["momentum"] == 0.9 and meta["args"]["image_size"] == 12 and meta["args"]["use_cuda"] is False


@pytest.mark.parametrize("text, value", [("False", False), ("TRUE", True), ("no", False), ("Yes", True), ("0", False),
                                         ("1", True)])
def test_boolean_flags_take_the_articles_values(text, value):
    flags = ("--multi_gpu", "--train_only") + (() if value else ("--use_cuda",))  # (--use_cuda true needs CUDA)
    for flag in flags:
        assert getattr(train.parse_args([flag, text, "--out", "unused"]), flag[2:]) is value
    assert train.parse_args(["--train_only", "--out", "unused"]).train_only is True  # no value: true


def test_boolean_flag_with_another_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--use_cuda", "maybe"])
    assert exc.value.code == 2 and "expected true/false" in capsys.readouterr().err


def test_train_only_skips_the_test_set_and_says_so(tmp_path, capsys):
    histories = run(tmp_path, "--train_only", "--compare")
    assert all(row["test_acc"] is None for rows in histories.values() for row in rows)
    assert "no test set (--train_only)" in capsys.readouterr().out
    assert "not measured (--train_only)" in (tmp_path / "out" / "compare.md").read_text()


def test_image_size_resizes_and_models_follow(tmp_path):
    for model in ("cnn", "article-mlp"):
        (history,) = run(tmp_path, "--model", model, "--image_size", "20", "--overwrite").values()
        assert history[-1]["train_loss"] < history[0]["train_loss"]


# --- the idx reader -----------------------------------------------------------------------------------------------------

def write_idx(path, array, gz=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype("uint8").tobytes()
    if gz:
        import gzip
        data = gzip.compress(data)
        path = path.with_name(path.name + ".gz")
    path.write_bytes(data)
    return path


def tiny_mnist(folder, gz=False):
    """MNIST's four files, small: each image has a bright row at a place given by its label, so it can be learnt."""
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for images_name, labels_name, n in ((train.MNIST_FILES[0], train.MNIST_FILES[1], 96),
                                        (train.MNIST_FILES[2], train.MNIST_FILES[3], 40)):
        labels = torch.randint(0, 10, (n,), generator=gen)
        images = torch.randint(0, 40, (n, 28, 28), generator=gen)
        images[torch.arange(n), 2 * labels + 4] = 255
        paths[labels_name] = write_idx(folder / labels_name, labels.numpy(), gz)
        paths[images_name] = write_idx(folder / images_name, images.numpy(), gz)
    return paths


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_idx_files_are_read_and_trained_on(tmp_path, gz, dataset):
    paths = tiny_mnist(tmp_path / "data", gz)
    images = train.read_idx(paths[train.MNIST_FILES[0]])
    assert images.shape == (96, 28, 28) and images.dtype.name == "uint8"
    (history,) = run(tmp_path, "--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--model", "article-mlp",
                     "--batch_size", "16").values()
    assert history[-1]["train_loss"] < history[0]["train_loss"] and history[-1]["test_acc"] is not None


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[:-5], "truncated or not one file"),
    (lambda b: b[:6], "shorter than its own header"),
    (lambda b: b"\x00\x00\x0d" + b[3:], "not an idx file of unsigned bytes"),
    (lambda b: b + b"extra", "truncated or not one file"),
], ids=["truncated", "cut in the header", "wrong magic", "trailing data"])
def test_damaged_idx_file_is_a_clear_error_and_writes_nothing(tmp_path, damage, match):
    paths = tiny_mnist(tmp_path / "data")
    target = paths[train.MNIST_FILES[2]]
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"))
    assert match in str(exc.value.code) and target.name in str(exc.value.code)
    assert not (tmp_path / "out").exists()


def test_truncated_gz_file_is_a_clear_error(tmp_path):
    paths = tiny_mnist(tmp_path / "data", gz=True)
    target = paths[train.MNIST_FILES[1]]
    target.write_bytes(target.read_bytes()[:20])
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"))
    assert "cannot be read" in str(exc.value.code) and not (tmp_path / "out").exists()


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nowhere"))
    message = str(exc.value.code)
    assert all(name in message for name in train.MNIST_FILES) and "apt-get install dataset-fashion-mnist" in message
