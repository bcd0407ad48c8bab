"""Evidence for FusedNAG's low-precision modes: train one small model in bfloat16 with each mode, and in float32.

    python benchmarks/precision_modes.py            # CPU: about a minute; --device cuda on a GPU

The model is an MLP on scikit-learn's bundled 8x8 digits (no download). Every run starts from the same float32
initialisation and sees the same batches; only the optimizer's precision mode differs:

  float32                      the reference: float32 params, FusedNAG (= torch SGD nesterov, bit for bit)
  bf16 (torch SGD)             bfloat16 params, torch.optim.SGD(nesterov=True): bfloat16 momentum, round to nearest
  bf16                         the same with FusedNAG's defaults
  bf16 + fp32 momentum         momentum_dtype=torch.float32
  bf16 + master weights        master_weights=True (float32 masters and momentum)
  bf16 + stochastic rounding   stochastic_rounding=True

The learning rate is small on purpose: most updates are then smaller than half a bfloat16 step of their weight, which
is where round-to-nearest loses them. The final training loss and test accuracy are evaluated in float32 from each
run's weights. Writes a markdown table, JSON and a PNG of the loss curves under --out.
"""

import argparse
import datetime
import json
import platform
import re
import shlex
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from nag_cuda import FusedNAG

MODES = {  # name: (param dtype, optimizer factory)
    "float32": (torch.float32, lambda p, hp: FusedNAG(p, **hp)),
    "bf16 (torch SGD)": (torch.bfloat16, lambda p, hp: torch.optim.SGD(p, nesterov=True, **hp)),
    "bf16": (torch.bfloat16, lambda p, hp: FusedNAG(p, **hp)),
    "bf16 + fp32 momentum": (torch.bfloat16, lambda p, hp: FusedNAG(p, momentum_dtype=torch.float32, **hp)),
    "bf16 + master weights": (torch.bfloat16, lambda p, hp: FusedNAG(p, master_weights=True, **hp)),
    "bf16 + stochastic rounding": (torch.bfloat16, lambda p, hp: FusedNAG(p, stochastic_rounding=True, **hp)),
}


def digits(device):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


@torch.no_grad()
def evaluate(net, x, y):
    """Loss and accuracy in float32, from the run's own weights."""
    ref = model(0).to(x.device)
    ref.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    out = ref(x)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train(mode, seed, data, args, device):
    dtype, make = MODES[mode]
    (x, y), (x_test, y_test) = data
    net = model(seed).to(device=device, dtype=dtype)
    torch.manual_seed(seed)  # the same stochastic-rounding seed per seed, drawn from torch's generator
    opt = make(net.parameters(), dict(lr=args.lr, momentum=0.9, weight_decay=args.weight_decay))
    batches = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=batches).to(device)
        loss = nn.functional.cross_entropy(net(x[idx].to(dtype)).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % args.eval_every == 0:
            curve.append((step + 1, evaluate(net, x, y)[0]))
    train_loss, _ = evaluate(net, x, y)
    _, test_acc = evaluate(net, x_test, y_test)
    return dict(train_loss=train_loss, test_acc=test_acc, curve=curve)


def summarise(runs, reference):
    ref = statistics.mean(r["train_loss"] for r in runs[reference])
    rows = {}
    for mode, rs in runs.items():
        losses = [r["train_loss"] for r in rs]
        rows[mode] = dict(train_loss=statistics.mean(losses),
                          train_loss_sd=statistics.stdev(losses) if len(losses) > 1 else 0.0,
                          vs_float32=statistics.mean(losses) / ref,
                          test_acc=statistics.mean(r["test_acc"] for r in rs))
    return rows


def markdown(result):
    meta = result["meta"]
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, {meta['date']}; {meta['steps']} steps of batch "
             f"{meta['batch']}, lr {meta['lr']}, momentum 0.9, weight decay {meta['weight_decay']}, "
             f"{meta['seeds']} seeds", f"Command: `{meta['command']}`", "",
             "| mode | final train loss (mean ± sd) | ÷ float32 loss | test accuracy |",
             "| --- | ---: | ---: | ---: |"]
    for mode, r in result["summary"].items():
        lines.append(f"| {mode} | {r['train_loss']:.4f} ± {r['train_loss_sd']:.4f} | {r['vs_float32']:.2f} "
                     f"| {100 * r['test_acc']:.1f}% |")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, rs in result["runs"].items():
        steps = [s for s, _ in rs[0]["curve"]]
        mean = [statistics.mean(r["curve"][i][1] for r in rs) for i in range(len(steps))]
        ax.plot(steps, mean, label=mode, linestyle="--" if mode == "float32" else "-")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (float32 evaluation, mean over seeds)")
    ax.set_title(f"FusedNAG precision modes, digits MLP, lr {result['meta']['lr']} ({result['meta']['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < args.eval_every or args.seeds < 1:
        parser.error("need --steps >= --eval-every and --seeds >= 1")

    device = torch.device(args.device)
    data = digits(device)
    runs = {mode: [] for mode in MODES}
    for seed in range(args.seeds):
        for mode in MODES:
            runs[mode].append(train(mode, seed, data, args, device))
            print(f"seed {seed} {mode}: train loss {runs[mode][-1]['train_loss']:.4f}, "
                  f"test accuracy {100 * runs[mode][-1]['test_acc']:.1f}%", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = dict(device=name, torch=torch.__version__, date=datetime.date.today().isoformat(), steps=args.steps,
                batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, seeds=args.seeds,
                command=" ".join(["python"] + [shlex.quote(a) for a in sys.argv]))
    result = dict(meta=meta, summary=summarise(runs, "float32"), runs=runs)
    table = markdown(result)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "precision-modes-" + re.sub(r"[^a-z0-9]+", "-", device.type).strip("-")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(table + "\n")
    if not args.no_plot:
        plot(result, args.out / f"{stem}.png")
    print(f"\nwrote {stem}.* in {args.out}")
    return result


if __name__ == "__main__":
    main()
