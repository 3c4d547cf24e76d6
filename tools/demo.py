"""Train a tiny character-level language model with lion_ops.Lion.

The corpus is the source code of a few modules of Python's own standard library, read from
the local installation, so the demo needs no downloads. A small causal transformer learns to
predict the next character; the demo prints the training loss as it goes and ends with a
summary: training and held-out validation loss before and after, the median time of
`optimizer.step()`, and the bytes of optimizer state per parameter.

    python tools/demo.py                # about half a minute on 2 CPU cores
    python tools/demo.py --steps 2000 --device cuda --compile
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # before importing torch, so the total time includes startup

import argparse
import math
import os
import statistics

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lion_ops import Lion, Lion8bit

# Standard-library files that make up the corpus, relative to the stdlib directory. All of
# them exist in every CPython from 3.10 on; the order is fixed so the corpus is too.
CORPUS_FILES = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "functools.py",
    "textwrap.py",
)
# Characters the model knows: printable ASCII plus newline; anything else maps to UNKNOWN.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
VALIDATION_FRACTION = 0.1


# ---- data ---------------------------------------------------------------------------------
def load_corpus() -> tuple[Tensor, list[str]]:
    """Returns the corpus as a 1-D tensor of character ids, and the files it was read from."""
    stdlib = os.path.dirname(os.__file__)
    index = {ch: i for i, ch in enumerate(VOCAB)}
    texts, used = [], []
    for name in CORPUS_FILES:
        path = os.path.join(stdlib, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
            used.append(name)
    if not texts:
        raise SystemExit(f"none of {CORPUS_FILES} found under {stdlib}")
    text = "\n".join(texts).replace("\t", "    ")
    ids = torch.tensor([index.get(ch, UNKNOWN) for ch in text], dtype=torch.long)
    return ids, used


def sample_batch(data: Tensor, batch_size: int, context: int, generator: torch.Generator,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """Random windows of `context` characters (inputs) and the same shifted by one (targets)."""
    starts = torch.randint(len(data) - context - 1, (batch_size,), generator=generator)
    windows = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
    windows = windows.to(device, non_blocking=True)
    return windows[:, :-1], windows[:, 1:]


# ---- model --------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention, then a 4x MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=-1)
        # (batch, length, width) -> (batch, heads, length, width / heads)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """A small GPT-style model over characters; the output layer shares the embedding."""

    def __init__(self, vocab_size: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        return self.norm(self.blocks(x)) @ self.embed.weight.t()


def loss_of(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def validation_batches(data: Tensor, batch_size: int, context: int,
                       device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """All of `data`, cut into consecutive windows (the same every run), in batches."""
    count = (len(data) - 1) // (context + 1)
    windows = data[:count * (context + 1)].view(count, context + 1).to(device)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean loss per character over the batches."""
    total = sum(loss_of(model, x, y) * x.numel() for x, y in batches)
    return float(total) / sum(x.numel() for x, _ in batches)


# ---- training -----------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if available, else cpu")
    parser.add_argument("--lr", type=float, default=5e-4,
                        help="peak Lion learning rate (default 5e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--optimizer", choices=["lion", "lion8bit"], default="lion",
                        help="lion (32-bit state) or lion8bit (8-bit state for tensors of "
                             "4096+ elements)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=32, help="characters per window")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1; 0 = torch's default). Matrices this small "
                             "gain little from more, and on a busy or virtualized machine extra "
                             "threads can make every op many times slower")
    parser.add_argument("--log-every", type=int, default=0,
                        help="print the loss every N steps (default: about 10 lines)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the forward (and so backward) pass and "
                             "optimizer.step()")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.width % args.heads:
        raise SystemExit("--width must be a multiple of --heads")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # batch sampling, on the CPU

    data, files = load_corpus()
    split = int(len(data) * (1 - VALIDATION_FRACTION))
    train_data, val_data = data[:split], data[split:]
    val_batches = validation_batches(val_data, 64, args.context, device)

    model = CharTransformer(VOCAB_SIZE, args.context, args.width, args.layers,
                            args.heads).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    # The lr is a 0-dim tensor so the schedule can change it in place without recompiling
    # the optimizer step under torch.compile.
    lr = torch.tensor(args.lr, dtype=torch.float32)
    optimizer_class = {"lion": Lion, "lion8bit": Lion8bit}[args.optimizer]
    optimizer = optimizer_class(model.parameters(), lr=lr, betas=(0.9, 0.99),
                                weight_decay=args.weight_decay)

    forward = loss_of
    optimizer_step = optimizer.step
    if args.compile:
        # The forward pass (AOTAutograd compiles its backward with it) and the optimizer
        # step, whose lion_ops operators inductor calls like any other op.
        forward = torch.compile(loss_of)
        optimizer_step = torch.compile(optimizer.step)

    threads = torch.get_num_threads()
    print(f"corpus: {len(data):,} characters from {len(files)} stdlib files "
          f"({', '.join(files)}), {len(train_data):,} train / {len(val_data):,} validation")
    print(f"model: {n_params / 1e6:.2f} M params ({args.layers} layers, width {args.width}, "
          f"context {args.context}), {optimizer_class.__name__} lr={args.lr:g} wd={args.weight_decay:g}, "
          f"{args.steps} steps of {args.batch_size}x{args.context} characters on {device}"
          f"{f', {threads} thread' + 's' * (threads > 1) if device.type == 'cpu' else ''}"
          f"{', compiled' if args.compile else ''}")
    val_before = validation_loss(model, val_batches)

    log_every = args.log_every or max(1, args.steps // 10)
    warmup = max(1, args.steps // 20)
    losses, step_times, last_logged = [], [], 0
    for step in range(1, args.steps + 1):
        # Linear warmup, then cosine decay to 10% of the peak lr.
        progress = max(0.0, (step - warmup) / max(1, args.steps - warmup))
        scale = min(1.0, step / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        lr.fill_(args.lr * scale)

        inputs, targets = sample_batch(train_data, args.batch_size, args.context, generator,
                                       device)
        loss = forward(model, inputs, targets)
        loss.backward()

        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        optimizer_step()
        if cuda:
            torch.cuda.synchronize(device)
        step_times.append(time.perf_counter() - t0)
        optimizer.zero_grad(set_to_none=True)

        losses.append(loss.item())
        if step == 1 or step % log_every == 0 or step == args.steps:
            # The mean since the last line: one batch alone is a noisy estimate.
            recent = losses[last_logged:]
            print(f"step {step:5d}  train loss {sum(recent) / len(recent):.3f}  "
                  f"lr {args.lr * scale:.2e}")
            last_logged = step

    val_after = validation_loss(model, val_batches)
    state_bytes = sum(t.nbytes for state in optimizer.state.values()
                      for t in state.values() if isinstance(t, Tensor))
    window = max(1, len(losses) // 10)

    print("\n== summary")
    print(f"train loss        {losses[0]:.3f} (step 1) -> {sum(losses[-window:]) / window:.3f} "
          f"(mean of the last {window} steps); uniform guess = {math.log(VOCAB_SIZE):.3f}")
    print(f"validation loss   {val_before:.3f} -> {val_after:.3f} "
          f"({val_after / math.log(2):.2f} bits per character)")
    # The median ignores the few slow first steps (state allocation, compilation).
    print(f"optimizer.step()  {statistics.median(step_times) * 1e3:.2f} ms median over "
          f"{len(step_times)} steps ({n_params / 1e6:.2f} M params, {device})")
    print(f"optimizer state   {state_bytes / n_params:.2f} bytes per param "
          f"({state_bytes:,} bytes for {n_params:,} params)")
    print(f"total time        {time.perf_counter() - _START:.1f} s (including startup)")


if __name__ == "__main__":
    main()
