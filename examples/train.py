"""Train a small model on handwritten digits with FusedNAG or one of torch's SGD variants.

    python examples/train.py                  # the article's CNN on scikit-learn's bundled 8x8 digits, FusedNAG, CPU
    python examples/train.py --compare        # SGD, SGD+momentum, torch SGD-nesterov and FusedNAG, same seed
    python examples/train.py --compare fusednag sgd-nesterov   # only these
    python examples/train.py --dataset fashion-mnist   # 70,000 28x28 images (Debian: apt-get install dataset-fashion-mnist)
    python examples/train.py --dataset mnist --data-dir DIR   # MNIST's four idx files already in DIR
    python examples/train.py --multi_gpu      # data-parallel through torchrun: NCCL on GPUs, gloo (2 processes) on CPU

The article's command lines run as written, e.g.
    python examples/train.py --model cnn --num_epochs 1 --learning_rate 0.01 --Momentum 0.9 --use_cuda False \
        --batch_size 64 --multi_gpu False --image_size 28 --train_only False

Every run writes metrics.csv, metrics.json and curves.png (and compare.md with --compare) to --out, by default a new
folder under runs/. No data is downloaded: digits ship inside scikit-learn, and (Fashion-)MNIST is read from its idx
files in --data-dir.
"""

import argparse
import csv
import datetime
import gzip
import json
import math
import os
import statistics
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

from nag_cuda import FusedNAG

# sgd-nesterov is torch's for-loop; -foreach and -fused are its other two modes, the same math, for timing step().
OPTIMIZERS = ["fusednag", "sgd-nesterov", "sgd-momentum", "sgd", "sgd-nesterov-foreach", "sgd-nesterov-fused"]
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist puts its files


# --- data -----------------------------------------------------------------------------------------------------------

def digits():
    """scikit-learn's 1797 8x8 digits, split once and for all: 1437 train, 360 test (independent of --seed)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    mean, std = x[train].mean(), x[train].std()
    return TensorDataset((x[train] - mean) / std, y[train]), TensorDataset((x[test] - mean) / std, y[test])


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (MNIST's format), gzipped or not, as an array of the shape its header gives."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # a truncated or corrupt .gz file
        raise ValueError(f"{path}: cannot be read: {error}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an idx file of unsigned bytes (it starts with {data[:4].hex()}, "
                         "expected 000008 and the number of dimensions)")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shorter than its own header")
    shape = struct.unpack(f">{data[3]}I", data[4:header])
    if len(data) != header + math.prod(shape):
        raise ValueError(f"{path}: {len(data) - header} bytes of data, but its header says {shape} "
                         f"({math.prod(shape)} bytes): truncated or not one file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def idx_dataset(name: str, data_dir: Path):
    """MNIST or Fashion-MNIST from its four idx files (gzipped or not) in data_dir, or in data_dir/MNIST/raw where
    torchvision keeps them; normalised with the training set's mean and std. Never downloads."""
    files = {}
    for base in MNIST_FILES:
        for candidate in (folder / f"{base}{ext}" for folder in (data_dir, data_dir / "MNIST" / "raw")
                          for ext in ("", ".gz")):
            if candidate.is_file():
                files[base] = candidate
                break
    missing = [base for base in MNIST_FILES if base not in files]
    if missing:
        where = ("Debian and Ubuntu package them: apt-get install dataset-fashion-mnist (into "
                 f"{FASHION_MNIST_DIR}); or take them from github.com/zalandoresearch/fashion-mnist"
                 if name == "fashion-mnist" else
                 "they come from yann.lecun.com/exdb/mnist or torchvision.datasets.MNIST(DIR, download=True), which "
                 "puts them in DIR/MNIST/raw")
        sys.exit(f"train.py: --dataset {name}: missing in {data_dir}: {', '.join(missing)} (or the same with .gz).\n"
                 f"The four files are {', '.join(MNIST_FILES)}; {where}. This script does not download.")
    try:
        arrays = [read_idx(files[base]) for base in MNIST_FILES]
    except ValueError as error:
        sys.exit(f"train.py: --dataset {name}: {error}")
    sets = []
    for images, labels in (arrays[:2], arrays[2:]):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            sys.exit(f"train.py: --dataset {name}: images {images.shape} and labels {labels.shape} do not match "
                     "(expected N x H x W images and N labels)")
        sets.append((torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255.0, torch.tensor(labels).long()))
    mean, std = sets[0][0].mean(), sets[0][0].std()
    return tuple(TensorDataset((x - mean) / std, y) for x, y in sets)


def resized(dataset: TensorDataset, size: int) -> TensorDataset:
    """--image_size: the images resized to size x size once, before training (bilinear, antialiased)."""
    x, y = dataset.tensors
    if x.shape[-1] == size and x.shape[-2] == size:
        return dataset
    return TensorDataset(nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True), y)


# --- models ---------------------------------------------------------------------------------------------------------

def cnn(size):
    """The article's small CNN (PyTorch's MNIST example), with padded convolutions so it also fits 8x8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * (size // 2) ** 2, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )


def mlp(size):
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def article_mlp(size):
    """The article's digit classifier: 784 (size x size) inputs, 128 ReLU units, dropout 0.2, 10 outputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def resnet18(size):
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)  # one channel, and no early downsampling of small images
    model.maxpool = nn.Identity()
    return model


MODELS = {"cnn": cnn, "mlp": mlp, "article-mlp": article_mlp, "resnet18": resnet18}


def make_optimizer(name, params, args):
    if name == "fusednag":
        return FusedNAG(params, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay)
    momentum = 0.0 if name == "sgd" else args.momentum
    return torch.optim.SGD(params, lr=args.learning_rate, momentum=momentum, weight_decay=args.weight_decay,
                           nesterov=name.startswith("sgd-nesterov"), foreach=name.endswith("-foreach"),
                           fused=True if name.endswith("-fused") else None)


# --- training -------------------------------------------------------------------------------------------------------

def evaluate(model, data, device):
    model.eval()
    x, y = data.tensors
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 1000].to(device)).cpu() for i in range(0, len(y), 1000)])
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train(name, args, train_set, test_set, device, rank, world, seed):
    """One optimizer's run: a list of per-epoch metrics (the same on every rank)."""
    torch.manual_seed(seed)  # the same initial model and dropout masks for every optimizer
    model = MODELS[args.model](train_set.tensors[0].shape[-1]).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(name, model.parameters(), args)
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=seed)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)
    else:
        sampler = None
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
    history = []
    for epoch in range(1, args.num_epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        start = time.perf_counter()
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        step_seconds = 0.0  # in optimizer.step(): what the optimizer costs inside training (host time on CUDA)
        batches = tqdm(loader, desc=f"{name} epoch {epoch}/{args.num_epochs}", leave=False, disable=rank != 0,
                       total=min(len(loader), args.max_batches or len(loader)))
        for i, (x, y) in enumerate(batches):
            if args.max_batches and i >= args.max_batches:
                break
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            loss.backward()
            step_start = time.perf_counter()
            opt.step()
            step_seconds += time.perf_counter() - step_start
            totals += torch.tensor([loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)])
        if world > 1:  # every rank saw its own shard
            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        seconds = time.perf_counter() - start
        test_loss, test_acc = (None, None) if args.train_only else evaluate(model, test_set, device)
        row = dict(optimizer=name, seed=seed, epoch=epoch, train_loss=(totals[0] / totals[2]).item(),
                   train_acc=(totals[1] / totals[2]).item(), test_loss=test_loss, test_acc=test_acc, seconds=seconds,
                   step_seconds=step_seconds)
        history.append(row)
        if rank == 0:
            test = "no test set (--train_only)" if args.train_only else f"test {100 * test_acc:.2f}%"
            print(f"[{name}] epoch {epoch}/{args.num_epochs}  loss {row['train_loss']:.4f}  "
                  f"train {100 * row['train_acc']:.2f}%  {test}  {seconds:.2f} s", flush=True)
    return history


# --- output ---------------------------------------------------------------------------------------------------------

def by_seed(rows):
    seeds = {}
    for row in rows:
        seeds.setdefault(row["seed"], []).append(row)
    return list(seeds.values())


def table(histories):
    """Final-epoch numbers per optimizer; over several seeds, the mean and the range (min–max). Time per epoch and the
    share of it in optimizer.step() are medians over every epoch of every seed, so that one epoch slowed by other work
    on the machine does not move them."""
    lines = ["| optimizer | test accuracy | train loss | s/epoch | share in step() |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, rows in histories.items():
        last = [runs[-1] for runs in by_seed(rows)]

        def spread(key, scale=1.0, digits=2, unit=""):
            values = [scale * r[key] for r in last]
            mean = f"{sum(values) / len(values):.{digits}f}{unit}"
            return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}–{max(values):.{digits}f})"

        test = "not measured (--train_only)" if last[0]["test_acc"] is None else spread("test_acc", 100, unit="%")
        per_epoch = statistics.median(r["seconds"] for r in rows)
        share = statistics.median(r["step_seconds"] / r["seconds"] for r in rows)
        lines.append(f"| {name} | {test} | {spread('train_loss', digits=4)} | {per_epoch:.2f} | {100 * share:.1f}% |")
    return "\n".join(lines)


def plot(histories, title, path):
    """Train loss and test accuracy per epoch; over several seeds, the mean with the min–max range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    train_only = False
    for name, rows in histories.items():
        runs = by_seed(rows)
        epochs = [r["epoch"] for r in runs[0]]
        train_only = runs[0][-1]["test_acc"] is None
        # torch's Nesterov SGD is drawn dashed on top: where FusedNAG matches it, both show.
        nesterov = name.startswith("sgd-nesterov")
        style = dict(label=name, marker="x" if nesterov else "o", linestyle="--" if nesterov else "-",
                     zorder=3 if nesterov else 2)
        for ax, key, scale in ((left, "train_loss", 1), (right, "train_acc" if train_only else "test_acc", 100)):
            values = [[scale * run[e][key] for run in runs] for e in range(len(epochs))]
            line, = ax.plot(epochs, [sum(v) / len(v) for v in values], **style)
            if len(runs) > 1:
                ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], alpha=0.15,
                                color=line.get_color())
    left.set(xlabel="epoch", ylabel="train loss", yscale="log")
    right.set(xlabel="epoch", ylabel="train accuracy (%), no test set: --train_only" if train_only
              else "test accuracy (%)")
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out: Path, args, device, histories, world):
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for rs in histories.values() for r in rs]
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, device=str(device),
                processes=world, torch=torch.__version__, command=" ".join(["python"] + sys.argv),
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    (out / "metrics.json").write_text(json.dumps(dict(meta, history=histories), indent=2) + "\n")
    title = (f"{args.model} on {args.dataset}" + (f" at {args.image_size}x{args.image_size}" if args.image_size else "")
             + f", {device.type}" + (f" x{world}" if world > 1 else "") + (", train only" if args.train_only else ""))
    plot(histories, title, out / "curves.png")
    written = ["metrics.csv", "metrics.json", "curves.png"]
    if args.compare:
        seeds = ", ".join(str(seed) for seed in args.seeds)
        (out / "compare.md").write_text(f"{title}, {args.num_epochs} epochs, seed{'s' * (len(args.seeds) > 1)} "
                                        f"{seeds}\n\n{table(histories)}\n")
        written.append("compare.md")
    print(f"wrote {', '.join(written)} in {out}")


# --- command line ---------------------------------------------------------------------------------------------------

def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def boolean(text):
    """The article's `--use_cuda False`: true/false, 1/0, yes/no, in any case."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true/false, 1/0 or yes/no, got {text!r}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="cnn",
                        help="article-mlp: the article's 784-128-10 classifier with dropout 0.2")
    parser.add_argument("--dataset", choices=["digits", "mnist", "fashion-mnist"], default="digits")
    parser.add_argument("--data-dir", type=Path,
                        help=f"holds the four idx files (default: {FASHION_MNIST_DIR} for fashion-mnist, data for mnist)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="fusednag")
    parser.add_argument("--compare", nargs="*", choices=OPTIMIZERS, metavar="OPTIMIZER",
                        help="run every optimizer (or the ones named) and write a comparison")
    parser.add_argument("--num_epochs", type=positive(int), default=5)
    parser.add_argument("--learning_rate", type=positive(float), default=0.05)
    parser.add_argument("--momentum", "--Momentum", type=positive(float), default=0.9,
                        help="for every optimizer except sgd")
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--batch_size", type=positive(int), default=64)
    parser.add_argument("--image_size", type=positive(int), help="resize the images to N x N (default: as stored)")
    parser.add_argument("--train_only", nargs="?", const=True, default=False, type=boolean,
                        help="no test-set evaluation (a value is optional: --train_only, --train_only true)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                        help="auto: CUDA when available, else CPU with a warning")
    parser.add_argument("--use_cuda", nargs="?", const=True, default=False, type=boolean,
                        help="the same as --device cuda (a value is optional: --use_cuda, --use_cuda False)")
    parser.add_argument("--multi_gpu", nargs="?", const=True, default=False, type=boolean,
                        help="data-parallel over all GPUs (or 2 CPU processes) through torchrun")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", help="several seeds in one run: each optimizer runs once per "
                        "seed, and the table and plot show the mean and range (default: --seed alone)")
    parser.add_argument("--out", type=Path, help="output folder (default: a new folder under runs/)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    parser.add_argument("--max-batches", type=positive(int), help="stop each epoch after this many batches (smoke runs)")
    args = parser.parse_args(argv)
    if args.weight_decay < 0:
        parser.error(f"--weight_decay must be >= 0, got {args.weight_decay}")
    args.seeds = args.seeds or [args.seed]
    if args.compare is not None:  # --compare alone: all of them, plain SGD first
        args.compare = list(dict.fromkeys(args.compare)) or OPTIMIZERS[3::-1] + OPTIMIZERS[4:]
    if args.data_dir is None:
        args.data_dir = FASHION_MNIST_DIR if args.dataset == "fashion-mnist" else Path("data")
    if args.use_cuda:
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--use_cuda/--device cuda: CUDA is not available here (use --device auto to fall back to CPU)")
    if args.device == "auto":
        if not torch.cuda.is_available():
            print("train.py: warning: CUDA is not available, training on the CPU", file=sys.stderr)
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model == "resnet18":
        try:
            import torchvision  # noqa: F401
        except Exception as error:
            parser.error(f"--model resnet18 needs torchvision, which does not import here: {error}")
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = Path("runs") / f"{stamp}-{args.dataset}-{args.model}-{'compare' if args.compare else args.optimizer}"
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty; pass --overwrite or choose another folder")
    return args


def relaunch_with_torchrun(argv, args):
    """--multi_gpu outside torchrun: start one process per GPU (2 on CPU) through torch.distributed.run."""
    from torch.distributed.run import main as torchrun

    procs = torch.cuda.device_count() if args.device == "cuda" else 2
    print(f"train.py: --multi_gpu: starting {procs} processes with torchrun", flush=True)
    # The children get the resolved --out, so that they agree on it; they run the same checks again.
    torchrun(["--standalone", f"--nproc_per_node={procs}", __file__, *argv, "--out", str(args.out)])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.multi_gpu and "LOCAL_RANK" not in os.environ:
        return relaunch_with_torchrun(argv, args)
    world, rank = 1, 0
    device = torch.device(args.device)
    if args.multi_gpu:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        if args.device == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    try:
        train_set, test_set = digits() if args.dataset == "digits" else idx_dataset(args.dataset, args.data_dir)
        if args.image_size:
            train_set, test_set = resized(train_set, args.image_size), resized(test_set, args.image_size)
        names = args.compare or [args.optimizer]
        histories = {name: [row for seed in args.seeds for row in train(name, args, train_set, test_set, device, rank,
                                                                        world, seed)]
                     for name in names}
        if rank == 0:
            if args.compare:
                print("\n" + table(histories))
            write_outputs(args.out, args, device, histories, world)
        return histories
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
