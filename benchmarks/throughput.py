"""Training throughput of DCGAN-28: the tutorial loop against the engine.

One run measures, for each batch size, 1 D + 1 G update per batch (loss ns, Adam):
  (a) tutorial: a Dataset of uint8 numpy images converted and normalized per item,
      DataLoader(shuffle=True), eager fp32 step written out below, .item() per step;
  (b) engine: GANTrainer + DeviceBatches, eager, as shipped;
  (c) engine fastest: CUDA graph + bf16 on CUDA (on CPU the same as (b)).

    python benchmarks/throughput.py --out OUT/throughput.json [--device cuda] [--steps 200] [--batch-sizes 64 512]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from gan.data import DeviceBatches, read_idx  # noqa: E402
from gan.engine import EngineConfig, GANTrainer  # noqa: E402
from gan.models import build_models  # noqa: E402
from pipeline.config import load_config  # noqa: E402

EPOCH_IMAGES = 60_000
TARGETS = {64: 50_000, 512: 150_000}  # (c) on one H100, img/s
LATENT_DIM = 100


def load_images(path: str | None) -> tuple[np.ndarray, str]:
    """(N, 28, 28) uint8 images and where they came from."""
    if path:
        source = Path(path)
        if not source.exists():
            raise SystemExit(f"--data {path}: no such file")
        return read_idx(source, expect_ndim=3), str(source)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (10_000, 28, 28), dtype=np.uint8), "synthetic random uint8 (no --data given)"


class TutorialDataset(torch.utils.data.Dataset):
    """The tutorial's dataset: each item becomes a float tensor and is normalized on its own."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = torch.from_numpy(self.images[index]).float().div(255.0).unsqueeze(0)  # ToTensor
        return (image - 0.5) / 0.5  # Normalize((0.5,), (0.5,))


def tutorial_step(generator, discriminator, opt_g, opt_d, real, device) -> tuple[float, float]:
    """The engine's math (ns loss, one D forward on cat([real, fake])), written the tutorial way."""
    real = real.to(device)
    n = len(real)
    ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)

    fake = generator(torch.randn(n, LATENT_DIM, device=device))
    logits = discriminator(torch.cat([real, fake.detach()]))
    loss_d = (F.binary_cross_entropy_with_logits(logits[:n], ones)
              + F.binary_cross_entropy_with_logits(logits[n:], zeros))
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()

    fake = generator(torch.randn(n, LATENT_DIM, device=device))
    loss_g = F.binary_cross_entropy_with_logits(discriminator(torch.cat([real, fake]))[n:], ones)
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return loss_d.item(), loss_g.item()  # tutorials log every step: a host sync per step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def endless(iterable_factory):
    """Batches across as many epochs as the measurement needs."""
    while True:
        yield from iterable_factory()


def time_tutorial(models, images, batch_size, device, warmup, steps, workers) -> float:
    generator, discriminator = (copy.deepcopy(m).to(device) for m in models)
    opt_g = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loader = torch.utils.data.DataLoader(
        TutorialDataset(images), batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
    )
    batches = endless(lambda: loader)
    for real in itertools.islice(batches, warmup):
        tutorial_step(generator, discriminator, opt_g, opt_d, real, device)
    synchronize(device)
    start = time.perf_counter()
    for real in itertools.islice(batches, steps):
        tutorial_step(generator, discriminator, opt_g, opt_d, real, device)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def tutorial_step_config(graph: bool, bf16: bool, log_every: int) -> EngineConfig:
    """params.yaml's training knobs, set to the tutorial's step: the same loss and optimizer, no moving average."""
    return EngineConfig.from_mapping({**load_config(REPO_ROOT / "params.yaml").train.model_dump(), "loss": "ns",
                                      "optimizer": "adam", "g_ema": 0.0, "cuda_graph": graph, "bf16": bf16,
                                      "log_every": log_every})


def time_engine(models, images, batch_size, device, warmup, steps, *, graph: bool, bf16: bool
                ) -> tuple[float, GANTrainer]:
    """img/s of the engine, and the trainer (``use_graph`` says whether the graph really ran)."""
    generator, discriminator = (copy.deepcopy(m) for m in models)
    trainer = GANTrainer(generator, discriminator, tutorial_step_config(graph, bf16, log_every=max(steps, 1)),
                         device=device)
    data = DeviceBatches(torch.from_numpy(images).to(device), batch_size)
    batches = endless(lambda: data)
    trainer.train_epoch(itertools.islice(batches, warmup))  # includes the graph capture
    synchronize(device)
    start = time.perf_counter()
    trainer.train_epoch(itertools.islice(batches, steps))  # ends with its metric read-back
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start), trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default: 200 on CUDA, 5 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 30 on CUDA, 1 on CPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--data", help="an IDX images file, e.g. DATA_DIR/mnist/t10k-images-idx3-ubyte.gz (default: random images)")
    parser.add_argument("--loader-workers", type=int, help="DataLoader workers for (a) (default: 2 on CUDA, 0 on CPU)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write (docs/tables.py renders it)")
    args = parser.parse_args()

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    steps = args.steps or (200 if on_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (30 if on_cuda else 1)
    workers = args.loader_workers if args.loader_workers is not None else (2 if on_cuda else 0)
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    images, source = load_images(args.data)
    torch.manual_seed(0)
    models = build_models("dcgan", (1, 28, 28), latent_dim=LATENT_DIM)

    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}; data: {source} ({len(images)} images); "
          f"{steps} timed steps after {warmup} warm-up steps; DCGAN-28, 1 D + 1 G update per batch\n")
    print("| loop | batch | img/s | s/epoch (60k) | target (one H100) |")
    print("| --- | --- | --- | --- | --- |")
    ratios, rows = [], []
    for batch_size in args.batch_sizes:
        rates = {
            "a": time_tutorial(models, images, batch_size, device, warmup, steps, workers),
            "b": time_engine(models, images, batch_size, device, warmup, steps, graph=False, bf16=False)[0],
            "c": time_engine(models, images, batch_size, device, warmup, steps, graph=True, bf16=on_cuda)[0],
        }
        labels = {"a": "(a) tutorial: per-item transforms + DataLoader",
                  "b": "(b) engine, eager", "c": "(c) engine fastest (graph + bf16 on CUDA)"}
        for key, rate in rates.items():
            target = f">= {TARGETS[batch_size] / 1000:.0f}k img/s" if key == "c" and batch_size in TARGETS else ""
            print(f"| {labels[key]} | {batch_size} | {rate:,.0f} | {EPOCH_IMAGES / rate:.2f} | {target} |")
            rows.append({"loop": key, "batch": batch_size, "img_per_s": round(rate, 1)})
        ratios.append((batch_size, rates["c"] / rates["a"], rates["b"] / rates["a"]))
    print()
    for batch_size, c_over_a, b_over_a in ratios:
        print(f"batch {batch_size}: c/a = {c_over_a:.2f}x, b/a = {b_over_a:.2f}x")
    record = {"date": datetime.date.today().isoformat(), "machine": name, "torch": torch.__version__, "steps": steps,
              "data": Path(source).name, "rows": rows}  # the file name: the folder is the user's
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
