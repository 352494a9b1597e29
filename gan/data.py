"""Datasets: the registry, strict IDX parsing, and device-resident batches.

Pure PyTorch + NumPy. The pipeline's fetch/preprocess stages and the engine both
read from here, so a new IDX-style dataset is one entry in ``DATASETS``.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: its files (name -> published md5) and its sample shape."""

    name: str
    kind: str  # "idx": four IDX .gz files to fetch; "toy": sampled, nothing to fetch
    shape: tuple[int, ...]
    classes: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)


IDX_FILES = ("train_images", "train_labels", "test_images", "test_labels")
_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def idx_files(md5s: tuple[str, str, str, str]) -> dict[str, str]:
    """The four standard IDX file names, each with its published md5."""
    return {_IDX_NAMES[role]: md5 for role, md5 in zip(IDX_FILES, md5s)}


def idx_file_name(role: str) -> str:
    return _IDX_NAMES[role]


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="mnist",
            kind="idx",
            shape=(1, 28, 28),
            classes=tuple(str(d) for d in range(10)),
            files=idx_files((
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            )),
        ),
        DatasetSpec(
            name="fashion_mnist",
            kind="idx",
            shape=(1, 28, 28),
            classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            files=idx_files((
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            )),
        ),
        # The 1-D toy distribution of the classic GAN demo: N(4, 0.5), nothing to fetch.
        DatasetSpec(name="gaussian1d", kind="toy", shape=(1,)),
    )
}

GAUSSIAN1D_MEAN, GAUSSIAN1D_STD = 4.0, 0.5


class IDXError(ValueError):
    """A malformed IDX file; the message names the file and what is wrong."""


# IDX type codes (third header byte) -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, expect_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzipped or not) strictly: magic, dimensions and length."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:  # truncated gzip streams raise EOFError
        raise IDXError(f"{path.name}: cannot read ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(f"{path.name}: bad magic number {raw[:4].hex()} (expected 0000TTNN)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise IDXError(f"{path.name}: unknown IDX type code 0x{type_code:02x}")
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXError(f"{path.name}: has {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{path.name}: header truncated ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise IDXError(
            f"{path.name}: length {len(raw)} bytes does not match header dims {dims} "
            f"({expected} bytes expected{', file truncated' if len(raw) < expected else ''})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_idx_split(images_path: Path, labels_path: Path,
                   spec: DatasetSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,H,W) uint8 and labels (N,) int64, checked against each other and, given its ``spec``,
    against the dataset: its image size and its classes (bad data is refused here, not inside training)."""
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.dtype != np.uint8:
        raise IDXError(f"{images_path.name}: images must be unsigned bytes, got {images.dtype}")
    if len(images) != len(labels):
        raise IDXError(
            f"{labels_path.name}: {len(labels)} labels for {len(images)} images in {images_path.name}"
        )
    if spec is not None:
        size, allowed = images.shape[1:], spec.shape[1:]
        if size != allowed:
            raise IDXError(f"{images_path}: images are {'x'.join(map(str, size))}, "
                           f"{spec.name} images are {'x'.join(map(str, allowed))}")
        outside = np.flatnonzero((labels < 0) | (labels >= len(spec.classes)))
        if len(outside):
            raise IDXError(f"{labels_path}: label {labels[outside[0]]} at index {outside[0]} "
                           f"({len(outside)} such) is not a {spec.name} class: labels are 0..{len(spec.classes) - 1}")
    return images, labels.astype(np.int64)


def sample_gaussian1d(n: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """n draws of N(4, 0.5) as an (n, 1) float tensor."""
    z = torch.randn(n, 1, generator=generator, device=device)
    return z * GAUSSIAN1D_STD + GAUSSIAN1D_MEAN


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the generators' tanh range."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return images.detach().float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


class DeviceBatches:
    """A dataset held on the device, batched with a fresh on-device shuffle each epoch.

    uint8 images stay uint8 in memory (4x less than float) and are normalized to
    [-1, 1] one batch at a time on the device. There is no DataLoader and no host
    round trip: an epoch is one ``randperm`` and ``len(self)`` gathers. Float data
    (the 1-D toy set) is yielded as is. The last partial batch is dropped so every
    step has the same shape (needed for CUDA graph capture and for DDP).

    With ``labels`` (int64, one per sample, on the same device) each batch is an
    (images, labels) pair, gathered with the same shuffled index: what a
    class-conditional model trains on. The shuffle is the same with or without them.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, *, seed: int = 0, labels: torch.Tensor | None = None):
        if batch_size < 1 or batch_size > len(data):
            raise ValueError(f"batch_size {batch_size} must be in [1, {len(data)}] for this dataset")
        if labels is not None and (labels.shape != (len(data),) or labels.device != data.device):
            raise ValueError(f"labels must be ({len(data)},) on {data.device}, got {tuple(labels.shape)} "
                             f"on {labels.device}")
        if data.dtype == torch.uint8 and data.dim() == 3:
            data = data.unsqueeze(1)  # (N,H,W) -> (N,1,H,W)
        self.data = data
        self.labels = None if labels is None else labels.long()
        self.batch_size = batch_size
        self.generator = torch.Generator(device=data.device).manual_seed(seed)

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.data), device=self.data.device, generator=self.generator)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            batch = self.data[index]
            images = to_unit_range(batch) if batch.dtype == torch.uint8 else batch
            yield images if self.labels is None else (images, self.labels[index])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def shard(data: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The rank's contiguous, equal-sized slice (the remainder is dropped on every rank)."""
    per_rank = len(data) // world_size
    return data[rank * per_rank:(rank + 1) * per_rank]
