"""Train a small CNN on scikit-learn's bundled 8x8 handwritten digits with FusedNAG (no download, ~10 s on a CPU).

    python examples/quickstart.py [--epochs 5] [--device cpu|cuda]

It trains the same model from the same seed with torch.optim.SGD(nesterov=True) too and prints both, so you can see
that FusedNAG is a drop-in: the same update, in one fused kernel launch.
"""

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from nag_cuda import FusedNAG


def digits(device):
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1500], perm[1500:]  # a fixed split: 1500 train, 297 test
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def train(make_optimizer, epochs, device, batch_size=64):
    torch.manual_seed(0)
    (x, y), (x_test, y_test) = digits(device)
    model = small_cnn().to(device)
    opt = make_optimizer(model.parameters())
    order = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(len(y), generator=order).to(device)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"  epoch {epoch + 1}: loss {total / len(y):.4f}  test accuracy {100 * acc:.2f}%  "
              f"({time.perf_counter() - start:.2f} s)")
    return acc


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    print("FusedNAG")
    ours = train(lambda p: FusedNAG(p, **hyper), args.epochs, args.device)
    print("torch.optim.SGD(nesterov=True)")
    theirs = train(lambda p: torch.optim.SGD(p, nesterov=True, **hyper), args.epochs, args.device)
    print(f"final test accuracy: FusedNAG {100 * ours:.2f}%, torch SGD(nesterov=True) {100 * theirs:.2f}%")


if __name__ == "__main__":
    main()
