"""fetch@<dataset>: download the raw IDX files into data/raw/<dataset>/.

Mirrors are tried in order; each may be an http(s) URL prefix, a file:// URL or a
local directory. Each file is retried with exponential backoff, streamed to a
temporary name while its md5 is computed, checked against the published
checksum, and only then renamed into place: a failed or corrupt download leaves
nothing behind. The target folder is checked to be writable before any mirror is
asked, and a local write error is reported as such, never blamed on a mirror.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from gan.data import DATASETS, DatasetSpec
from pipeline.artifacts import NotWritableError, raw_dir, writable_folder
from pipeline.config import Config

log = logging.getLogger(__name__)

CHUNK = 1 << 16


class FetchError(RuntimeError):
    """Every mirror failed for a file; the message lists each mirror with its error."""


def _open_source(mirror: str, name: str, timeout: float) -> tuple[BinaryIO, int | None]:
    """An open binary stream for ``name`` on ``mirror`` and its size when known."""
    scheme = urlparse(mirror).scheme
    if scheme in ("http", "https"):
        url = mirror.rstrip("/") + "/" + name
        response = urllib.request.urlopen(url, timeout=timeout)  # raises HTTPError on 4xx/5xx
        length = response.headers.get("Content-Length")
        return response, int(length) if length else None
    directory = Path(unquote(urlparse(mirror).path)) if scheme == "file" else Path(mirror).expanduser()
    path = directory / name
    return path.open("rb"), path.stat().st_size


def _download_once(mirror: str, name: str, target: Path, expected_md5: str | None, timeout: float) -> None:
    """One attempt: stream to a temp file, verify, rename. Never leaves a partial file."""
    tmp = target.with_name(f".{target.name}.part")
    try:
        out = tmp.open("wb")
    except OSError as err:
        raise _local(tmp, err) from None
    try:
        source, size = _open_source(mirror, name, timeout)
        md5 = hashlib.md5()
        with source, out, tqdm(total=size, unit="B", unit_scale=True, desc=name, leave=False, disable=None) as bar:
            while chunk := source.read(CHUNK):
                try:
                    out.write(chunk)
                except OSError as err:  # a full disk is ours, not the mirror's
                    raise _local(tmp, err) from None
                md5.update(chunk)
                bar.update(len(chunk))
        if size is not None and tmp.stat().st_size != size:
            raise OSError(f"truncated: got {tmp.stat().st_size} of {size} bytes")
        if expected_md5 is not None and md5.hexdigest() != expected_md5:
            raise ValueError(f"md5 mismatch: got {md5.hexdigest()}, expected {expected_md5}")
        try:
            tmp.replace(target)
        except OSError as err:
            raise _local(target, err) from None
    finally:
        out.close()
        tmp.unlink(missing_ok=True)


def _local(path: Path, err: OSError) -> NotWritableError:
    return NotWritableError(f"{path}: cannot write ({err.strerror or err}): a problem of this folder or disk, "
                            "not of the mirror")


def _describe(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"unreachable ({err.reason})"
    if isinstance(err, http.client.IncompleteRead):
        return f"truncated: got {len(err.partial)} bytes, {err.expected} missing"
    if isinstance(err, FileNotFoundError):
        return f"no such file {err.filename}"
    return str(err) or type(err).__name__


def fetch_file(
    name: str,
    mirrors: list[str],
    target_dir: Path,
    *,
    expected_md5: str | None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Fetch one file from the first mirror that serves it intact."""
    target = target_dir / name
    errors: list[str] = []
    for mirror in mirrors:
        for attempt in range(retries):
            try:
                _download_once(mirror, name, target, expected_md5, timeout)
                return target
            except (OSError, ValueError, http.client.HTTPException) as err:
                last = _describe(err)
                log.warning("%s from %s failed (attempt %d/%d): %s", name, mirror, attempt + 1, retries, last)
                if attempt + 1 < retries:
                    sleep(backoff_s * 2**attempt)
        errors.append(f"  - {mirror}: {last}")
    raise FetchError(
        f"could not fetch {name}; every mirror failed:\n" + "\n".join(errors) +
        "\nTo use a local copy, put the .gz files in a directory and list it first in "
        "params.yaml data.mirrors (a path or a file:// URL), e.g. "
        "dvc exp run -S 'data.mirrors.<dataset>=[/path/to/files]'"
    )


def fetch_dataset(spec: DatasetSpec, mirrors: list[str], target_dir: Path, *,
                  verify_checksums: bool = True, retries: int = 3, timeout: float = 60.0,
                  backoff_s: float = 0.5) -> list[Path]:
    writable_folder(target_dir)
    if not verify_checksums:
        log.warning("data.verify_checksums is false: %s files are not checked against "
                    "their published md5", spec.name)
    return [
        fetch_file(name, mirrors, target_dir, expected_md5=md5 if verify_checksums else None,
                   retries=retries, timeout=timeout, backoff_s=backoff_s)
        for name, md5 in spec.files.items()
    ]


def run(cfg: Config, dataset: str) -> list[Path]:
    spec = DATASETS[dataset]
    target_dir = writable_folder(raw_dir(dataset))
    if spec.kind != "idx":
        # Sampled by the preprocess stage; the folder records that nothing was fetched.
        shutil.rmtree(target_dir, ignore_errors=True)
        target_dir.mkdir(parents=True)
        (target_dir / "SOURCE.txt").write_text(f"{dataset} is sampled in preprocess; nothing to fetch.\n")
        return []
    mirrors = cfg.data.mirrors[dataset]  # the config checked that a listed image dataset has mirrors
    paths = fetch_dataset(spec, mirrors, target_dir, verify_checksums=cfg.data.verify_checksums,
                          retries=cfg.data.retries, timeout=cfg.data.timeout_s)
    print(f"fetch@{dataset}: {len(paths)} files in {target_dir}")
    return paths
