"""Dataset registry tests: real on-disk formats, served over a loopback HTTP server."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import threading
import urllib.parse
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from gmmvit import data, registry
from gmmvit.data import DATASETS, DatasetError, load_dataset, prepare_dataset
from gmmvit.data import cache as data_cache
from gmmvit.data import decode as data_decode
from gmmvit.data import folder as data_folder
from gmmvit.data import tinyimagenet as data_tinyimagenet

DOWNLOADABLE = ["cifar10", "cifar100", "svhn", "tinyimagenet"]


# --------------------------------------------------------------------------------------------
# Loopback HTTP server


class FileServer:
    """Serves in-memory files; ``claimed_length`` lets a route lie about its Content-Length."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, int | None]] = {}
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] += 1
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, claimed = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(claimed if claimed is not None else len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, body: bytes, claimed_length: int | None = None) -> str:
        self.routes[path] = (body, claimed_length)
        return self.base + path

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    # A proxy configured in the environment must not intercept loopback requests.
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    for name in DOWNLOADABLE:
        monkeypatch.delenv(f"GMMVIT_{name.upper()}_URL", raising=False)
    fs = FileServer()
    thread = threading.Thread(target=fs.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fs
    fs.httpd.shutdown()
    fs.httpd.server_close()
    thread.join()


# --------------------------------------------------------------------------------------------
# Archives in the official layouts


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@dataclasses.dataclass
class Cifar:
    archive: bytes
    train_images: np.ndarray  # (N, 3, 32, 32)
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    names: list[str]


def make_cifar10(seed: int = 0) -> Cifar:
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 2)]
        # Bytes keys, as pickles written by Python 3 have them.
        batch = {b"batch_label": b"training batch", b"labels": y, b"data": x.reshape(2, 3072),
                 b"filenames": [b"a.png", b"b.png"]}
        files[f"cifar-10-batches-py/data_batch_{i}"] = pickle.dumps(batch, protocol=2)
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    test_y = [9, 0, 4]
    files["cifar-10-batches-py/test_batch"] = pickle.dumps(
        {b"labels": test_y, b"data": test_x.reshape(3, 3072)}, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {b"label_names": names, b"num_vis": 3072}, protocol=2)
    files["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return Cifar(_tar_gz(files), np.concatenate(train_x), np.array(train_y), test_x,
                 np.array(test_y), names)


def make_cifar100(seed: int = 1) -> Cifar:
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    test_x = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    train_y, test_y = [99, 0, 57, 3], [12, 99]
    names = [f"class{i}" for i in range(100)]
    # str keys, as the official Python 2 pickles give when read with encoding="latin1".
    files = {
        "cifar-100-python/train": pickle.dumps(
            {"data": train_x.reshape(4, 3072), "fine_labels": train_y, "coarse_labels": [0] * 4}),
        "cifar-100-python/test": pickle.dumps(
            {"data": test_x.reshape(2, 3072), "fine_labels": test_y, "coarse_labels": [0] * 2}),
        "cifar-100-python/meta": pickle.dumps(
            {"fine_label_names": names, "coarse_label_names": [f"c{i}" for i in range(20)]}),
        "cifar-100-python/file.txt~": b"",
    }
    return Cifar(_tar_gz(files), train_x, np.array(train_y), test_x, np.array(test_y), names)


def make_svhn_mat(labels: list[int], seed: int) -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(seed).integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"X": x, "y": np.array(labels, dtype=np.uint8).reshape(-1, 1)})
    return buffer.getvalue(), x


def _jpeg(color: tuple[int, int, int] | int, mode: str = "RGB", size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), color).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


TINY_WNIDS = ["n01443537", "n09999999"]
RED, BLUE = (230, 20, 20), (20, 20, 230)


def make_tiny_zip(extra: dict[str, bytes] | None = None) -> bytes:
    """Official layout: train/<wnid>/images, flat val/images + val_annotations.txt, test/; ``extra``
    adds files (paths relative to tiny-imagenet-200/)."""
    top = "tiny-imagenet-200"
    files: dict[str, bytes] = {
        f"{top}/wnids.txt": "\n".join(TINY_WNIDS).encode() + b"\n",
        f"{top}/words.txt": b"n01443537\tgoldfish\nn09999999\tsomething\n",
        f"{top}/test/images/test_0.JPEG": _jpeg((0, 255, 0)),
    }
    for k, wnid in enumerate(TINY_WNIDS):
        files[f"{top}/train/{wnid}/{wnid}_boxes.txt"] = f"{wnid}_0.JPEG\t0\t0\t10\t10\n".encode()
        files[f"{top}/train/{wnid}/images/{wnid}_0.JPEG"] = _jpeg(RED if k else BLUE)
        files[f"{top}/train/{wnid}/images/{wnid}_1.JPEG"] = _jpeg(128, mode="L")  # grayscale JPEG
    # val_0 belongs to the second class, so filename order differs from class order.
    files[f"{top}/val/images/val_0.JPEG"] = _jpeg(RED)
    files[f"{top}/val/images/val_1.JPEG"] = _jpeg(BLUE)
    files[f"{top}/val/val_annotations.txt"] = (
        f"val_0.JPEG\t{TINY_WNIDS[1]}\t0\t1\t60\t61\nval_1.JPEG\t{TINY_WNIDS[0]}\t3\t4\t50\t52\n").encode()
    files |= {f"{top}/{name}": content for name, content in (extra or {}).items()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buffer.getvalue()


TINY_SMALL = {"classes": 2, "train": 4, "val": 2}


def assert_nothing_prepared(root: Path, name: str) -> None:
    folder = root / DATASETS[name].folder  # type: ignore[operator]
    assert not folder.exists(), f"{folder} left behind"
    assert not data.is_prepared(name, root)
    assert not list(root.glob(f".prepare-{name}-*")), "temporary directory left behind"


# --------------------------------------------------------------------------------------------
# Registry


def test_registry_names_and_download_flags() -> None:
    assert set(data.dataset_names()) == {"digits", "cifar10", "cifar100", "svhn", "tinyimagenet", "folder"}
    assert [n for n in data.dataset_names() if data.needs_download(n)] == DOWNLOADABLE
    assert data.marker_path("digits", "x") is None
    assert data.marker_path("cifar10", "x") == Path("x/cifar-10-batches-py/.gmmvit-prepared.json")


def test_a_kind_module_is_imported_when_its_kind_is_first_used() -> None:
    """Importing gmmvit.data runs no kind's module: a training job runs (and the code hash it
    records covers) its own kind's reader and the shared modules that reader imports, nothing else."""
    code = ("import sys, gmmvit.data as d\n"
            "loaded = lambda: print(sorted(m for m in sys.modules if m.startswith('gmmvit.data.')))\n"
            "loaded(); d.load_dataset('digits'); loaded(); d.DATASETS['svhn']; loaded()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "['gmmvit.data.base']",
        "['gmmvit.data.base', 'gmmvit.data.digits']",
        "['gmmvit.data.base', 'gmmvit.data.cache', 'gmmvit.data.digits', 'gmmvit.data.download', "
        "'gmmvit.data.lock', 'gmmvit.data.progress', 'gmmvit.data.svhn']",
    ]


def test_each_kind_lives_in_the_module_the_registry_names() -> None:
    for kind in data.dataset_names():
        assert type(DATASETS[kind]).__module__ == f"gmmvit.data.{registry.DATASET_MODULES[kind]}", kind

    @dataclasses.dataclass(frozen=True)
    class ElsewhereSpec(data.DatasetSpec):
        pass

    for kind in ("svhn", "newkind"):  # a kind's spec defined outside its module, an unmapped kind
        with pytest.raises(ValueError, match=rf"'{kind}' is defined in data/test_data.py.*DATASET_MODULES"):
            data.register_dataset(ElsewhereSpec(kind, mean=None, std=None, autoaugment=None))
    assert "newkind" not in DATASETS and type(DATASETS["svhn"]).__name__ == "SvhnSpec"


@pytest.mark.parametrize("call", [
    lambda: load_dataset("imagenet1k"),
    lambda: prepare_dataset("imagenet1k"),
    lambda: data.needs_download("imagenet1k"),
    lambda: data.is_prepared("imagenet1k", "data"),
])
def test_unknown_name_lists_valid_names(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="imagenet1k") as info:
        call()
    for name in data.dataset_names():
        assert name in str(info.value)


# --------------------------------------------------------------------------------------------
# digits


def test_digits_fixed_split_shapes_and_stats(tmp_path: Path) -> None:
    ds = load_dataset("digits", root=tmp_path / "nowhere")
    assert (len(ds.train_images), len(ds.test_images)) == (1437, 360)
    assert ds.train_images.shape[1:] == (3, 32, 32) and ds.img_size == 32
    assert ds.train_images.dtype == ds.test_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64 and ds.train_images.is_contiguous()
    assert ds.num_classes == 10 and len(ds.classes) == 10 and ds.autoaugment is None
    # Real pixel data scaled to the full 0..255 range, greyscale replicated to RGB.
    assert int(ds.train_images.max()) == 255 and int(ds.train_images.min()) == 0
    assert torch.equal(ds.train_images[:, 0], ds.train_images[:, 2])
    # Stratified: every digit has 35 or 37 of the 360 test images (36 on average).
    assert set(torch.bincount(ds.test_labels, minlength=10).tolist()) <= {35, 36, 37}
    x = ds.train_images.double() / 255
    assert ds.mean == pytest.approx([x.mean().item()] * 3, abs=1e-9)
    assert ds.std == pytest.approx([x.std(unbiased=False).item()] * 3, abs=1e-9)

    again = load_dataset("digits")
    assert torch.equal(ds.train_images, again.train_images)
    assert torch.equal(ds.test_labels, again.test_labels)
    assert not (tmp_path / "nowhere").exists()
    assert data.is_prepared("digits", tmp_path) and not data.needs_download("digits")
    prepare_dataset("digits", root=tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_digits_rejects_options() -> None:
    with pytest.raises(TypeError, match="img_size"):
        load_dataset("digits", img_size=64)


# --------------------------------------------------------------------------------------------
# Missing data


@pytest.mark.parametrize("name, files", [
    ("cifar10", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]),
    ("cifar100", ["train", "test", "meta"]),
    ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
    ("tinyimagenet", ["train/", "val/"]),
])
def test_missing_data_names_folder_files_url_and_command(tmp_path: Path, name: str,
                                                         files: list[str]) -> None:
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root=root)
    message = str(info.value)
    assert str(root / DATASETS[name].folder) in message  # type: ignore[operator]
    for file in files:
        assert file in message
    for url in DATASETS[name].download_urls():
        assert url in message
    assert f"gmmvit prepare {name} --data-root {root}" in message


def test_partially_present_cifar_names_missing_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(b"")
    with pytest.raises(DatasetError, match="missing: data_batch_1.*test_batch"):
        load_dataset("cifar10", root=tmp_path)


# --------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_prepare_load_and_no_second_download(tmp_path: Path, server: FileServer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cifar = make_cifar10()
    url = server.add("/mirror/cifar-10-python.tar.gz", cifar.archive)
    folder = prepare_dataset("cifar10", root=tmp_path, url=url, progress=False)

    assert folder == tmp_path / "cifar-10-batches-py"
    marker = json.loads((folder / data.MARKER_NAME).read_text())
    assert marker["counts"] == {"classes": 10, "train": 10, "test": 3}
    assert marker["source"] == url
    assert data.is_prepared("cifar10", tmp_path)
    assert not list(tmp_path.glob(".prepare-cifar10-*"))

    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape == (10, 3, 32, 32)
    # Channel-major rows must come out as NCHW, batches in order 1..5.
    assert torch.equal(ds.train_images, torch.from_numpy(cifar.train_images))
    assert torch.equal(ds.test_images, torch.from_numpy(cifar.test_images))
    assert ds.train_labels.tolist() == cifar.train_labels.tolist()
    assert ds.test_labels.dtype == torch.int64 and ds.test_labels.tolist() == [9, 0, 4]
    assert ds.classes == tuple(cifar.names) and ds.num_classes == 10
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.autoaugment == "cifar10"

    assert server.total_hits == 1

    def no_reverification(self: object, folder: Path) -> dict[str, int]:
        raise AssertionError("a prepared dataset (marker present) must not be verified again")

    monkeypatch.setattr(type(DATASETS["cifar10"]), "verify", no_reverification)
    assert prepare_dataset("cifar10", root=tmp_path, url=url, progress=False) == folder
    assert server.total_hits == 1


def test_cifar100_from_env_url(tmp_path: Path, server: FileServer,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    cifar = make_cifar100()
    url = server.add("/c100.tgz", cifar.archive)
    monkeypatch.setenv("GMMVIT_CIFAR100_URL", url)
    prepare_dataset("cifar100", root=tmp_path, progress=False)  # no md5 check for a mirror
    assert server.hits["/c100.tgz"] == 1

    ds = load_dataset("cifar100", root=tmp_path)
    assert ds.num_classes == 100 and ds.classes[99] == "class99"
    assert ds.train_labels.tolist() == [99, 0, 57, 3] and ds.test_labels.tolist() == [12, 99]
    assert torch.equal(ds.test_images, torch.from_numpy(cifar.test_images))
    assert ds.autoaugment == "cifar10" and ds.std == (0.2673, 0.2564, 0.2762)


def test_local_archive_path_as_url(tmp_path: Path) -> None:
    archive = tmp_path / "downloads" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(make_cifar100().archive)
    prepare_dataset("cifar100", root=tmp_path / "data", url=str(archive), progress=False)
    assert load_dataset("cifar100", root=tmp_path / "data").train_labels.tolist() == [99, 0, 57, 3]


def test_official_url_is_md5_checked_but_mirror_is_not(tmp_path: Path, server: FileServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    archive = make_cifar10().archive
    url = server.add("/official/cifar-10-python.tar.gz", archive)
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(DATASETS["cifar10"], url=url))
    with pytest.raises(DatasetError, match="md5") as info:
        prepare_dataset("cifar10", root=tmp_path, progress=False)
    assert url in str(info.value)
    assert_nothing_prepared(tmp_path, "cifar10")

    prepare_dataset("cifar10", root=tmp_path, url=url, progress=False)
    assert data.is_prepared("cifar10", tmp_path)


@pytest.mark.parametrize("how", ["content-length-too-large", "cut-file"])
def test_truncated_download_leaves_nothing(tmp_path: Path, server: FileServer, how: str) -> None:
    archive = make_cifar10().archive
    half = archive[: len(archive) // 2]
    claimed = len(archive) if how == "content-length-too-large" else None
    url = server.add("/cifar.tar.gz", half, claimed_length=claimed)
    with pytest.raises(DatasetError) as info:
        prepare_dataset("cifar10", root=tmp_path, url=url, progress=False)
    message = str(info.value)
    assert url in message
    assert ("truncated" in message) if claimed else ("corrupt" in message)
    assert_nothing_prepared(tmp_path, "cifar10")


def test_an_archive_member_escaping_its_folder_is_named_unsafe(tmp_path: Path) -> None:
    """A crafted archive (a member ../escaped.txt beside the real files) is refused as unsafe, not
    as a cut download, and writes nothing outside the data root."""
    good = tarfile.open(fileobj=io.BytesIO(make_cifar10().archive), mode="r:gz")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as crafted:
        for member in good.getmembers():
            crafted.addfile(member, good.extractfile(member) if member.isfile() else None)
        evil = tarfile.TarInfo("../escaped.txt")
        evil.size = 5
        crafted.addfile(evil, io.BytesIO(b"owned"))
    archive = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(buffer.getvalue())
    root = tmp_path / "deep" / "data"
    with pytest.raises(DatasetError, match="is unsafe") as info:
        prepare_dataset("cifar10", root=root, url=str(archive), progress=False)
    assert "escaped.txt" in str(info.value) and "download it again" not in str(info.value)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert_nothing_prepared(root, "cifar10")


def test_readme_builds_the_cifar10_images_folder_from_the_official_files(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """README's recipe for data/cifar10-images, run as written on CIFAR-format files (5 batches of 2
    images): the first 500 of each class among batches 1-4 go to train/, batch 5 to test/, each PNG
    named by its position in the training set and equal to its source pixels."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Real images on a CPU"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL)[1]
    cifar = make_cifar10()
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(cifar.archive)
    prepare_dataset("cifar10", root=tmp_path / "data", url=str(archive), progress=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    found = {str(p.relative_to(tmp_path / "data/cifar10-images")) for p in tmp_path.rglob("*.png")}
    expected = {f"{'test' if i >= 8 else 'train'}/{cifar.names[cifar.train_labels[i]]}/{i}.png" for i in range(10)}
    assert found == expected
    for i in (0, 9):
        split = "test" if i >= 8 else "train"
        pixels = np.asarray(Image.open(tmp_path / f"data/cifar10-images/{split}/{cifar.names[cifar.train_labels[i]]}/{i}.png"))
        assert np.array_equal(pixels, cifar.train_images[i].transpose(1, 2, 0))


def test_corrupt_archives_leave_nothing(tmp_path: Path, server: FileServer) -> None:
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    cases = {
        "cifar10": server.add("/bad.tar.gz", garbage),
        "cifar100": server.add("/nottar.tar.gz", gzip.compress(garbage)),  # valid gzip, not a tar
        "tinyimagenet": server.add("/bad.zip", make_tiny_zip()[:-300] + garbage[:100]),
        "svhn": server.add("/svhn/train_32x32.mat", b"MATLAB 5.0" + garbage),
    }
    server.add("/svhn/test_32x32.mat", make_svhn_mat([1], 0)[0])
    cases["svhn"] = server.base + "/svhn"
    for name, url in cases.items():
        with pytest.raises(DatasetError, match="corrupt|cannot read") as info:
            prepare_dataset(name, root=tmp_path, url=url, progress=False, **(
                {"expected": TINY_SMALL} if name == "tinyimagenet" else {}))
        assert url in str(info.value)
        assert_nothing_prepared(tmp_path, name)


def test_stale_temporary_directory_is_replaced(tmp_path: Path, server: FileServer) -> None:
    stale = tmp_path / ".prepare-cifar10-x1y2z3"
    (stale / "unpacked" / "cifar-10-batches-py").mkdir(parents=True)
    (stale / "cifar-10-python.tar.gz").write_bytes(b"partial")
    other = tmp_path / ".prepare-cifar100-keep"  # another dataset's run is not ours to remove
    other.mkdir()
    url = server.add("/cifar.tar.gz", make_cifar10().archive)
    prepare_dataset("cifar10", root=tmp_path, url=url, progress=False)
    assert not stale.exists() and other.exists()
    assert load_dataset("cifar10", root=tmp_path).train_images.shape[0] == 10


def test_empty_final_folder_is_prepared_normally(tmp_path: Path, server: FileServer) -> None:
    # The workflow's marker is a Snakemake output, whose parent folder exists before the job runs.
    (tmp_path / "cifar-10-batches-py").mkdir()
    url = server.add("/cifar.tar.gz", make_cifar10().archive)
    prepare_dataset("cifar10", root=tmp_path, url=url, progress=False)
    assert data.is_prepared("cifar10", tmp_path) and server.total_hits == 1


def test_existing_folder_is_adopted_without_download(tmp_path: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(make_cifar10().archive)) as tf:
        tf.extractall(tmp_path, filter="data")
    # Port 9 (discard) is never contacted: the folder already verifies.
    prepare_dataset("cifar10", root=tmp_path, url="http://127.0.0.1:9/none.tar.gz", progress=False)
    assert data.is_prepared("cifar10", tmp_path)

    broken = tmp_path / "cifar-100-python"
    (broken / "train").parent.mkdir()
    (broken / "train").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="remove it"):
        prepare_dataset("cifar100", root=tmp_path, url="http://127.0.0.1:9/none", progress=False)
    assert (broken / "train").read_bytes() == b"not a pickle"  # user files are never deleted


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(make_cifar10().archive)) as tf:
        tf.extractall(tmp_path, filter="data")

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DatasetError, match="disallowed global builtins.print"):
        load_dataset("cifar10", root=tmp_path)


# --------------------------------------------------------------------------------------------
# SVHN


def test_svhn_prepare_and_load_maps_10_to_0(tmp_path: Path, server: FileServer) -> None:
    train_mat, train_x = make_svhn_mat([10, 1, 3, 10, 9], seed=0)
    test_mat, _ = make_svhn_mat([10, 5], seed=1)
    server.add("/housenumbers/train_32x32.mat", train_mat)
    server.add("/housenumbers/test_32x32.mat", test_mat)
    folder = prepare_dataset("svhn", root=tmp_path, url=server.base + "/housenumbers/", progress=False)
    assert folder == tmp_path / "svhn" and server.total_hits == 2
    assert json.loads((folder / data.MARKER_NAME).read_text())["counts"]["train"] == 5

    ds = load_dataset("svhn", root=tmp_path)
    assert ds.train_labels.tolist() == [0, 1, 3, 0, 9] and ds.test_labels.tolist() == [0, 5]
    assert ds.train_images.shape == (5, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert torch.equal(ds.train_images[2], torch.from_numpy(train_x[:, :, :, 2]).permute(2, 0, 1))
    assert ds.autoaugment == "svhn" and ds.num_classes == 10

    prepare_dataset("svhn", root=tmp_path, url=server.base + "/housenumbers", progress=False)
    assert server.total_hits == 2


def test_svhn_missing_test_file_leaves_nothing(tmp_path: Path, server: FileServer) -> None:
    server.add("/h/train_32x32.mat", make_svhn_mat([1, 2], 0)[0])
    with pytest.raises(DatasetError, match=r"HTTP 404") as info:
        prepare_dataset("svhn", root=tmp_path, url=server.base + "/h", progress=False)
    assert server.base + "/h/test_32x32.mat" in str(info.value)
    assert_nothing_prepared(tmp_path, "svhn")


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet


def test_tinyimagenet_prepare_sorts_val_and_loads(tmp_path: Path, server: FileServer) -> None:
    url = server.add("/tiny-imagenet-200.zip", make_tiny_zip())
    folder = prepare_dataset("tinyimagenet", root=tmp_path, url=url, progress=False,
                             expected=TINY_SMALL)
    assert (folder / "val" / TINY_WNIDS[1] / "val_0.JPEG").is_file()
    assert (folder / "val" / TINY_WNIDS[0] / "val_1.JPEG").is_file()
    assert not (folder / "val" / "images").exists()
    assert json.loads((folder / data.MARKER_NAME).read_text())["counts"] == TINY_SMALL

    ds = load_dataset("tinyimagenet", root=tmp_path, progress=False)
    assert ds.classes == tuple(TINY_WNIDS) and ds.num_classes == 2
    assert ds.train_images.shape == (4, 3, 64, 64) and ds.test_images.shape == (2, 3, 64, 64)
    assert ds.train_labels.tolist() == [0, 0, 1, 1]
    # The red val_0 image must carry the label of the class its annotation names.
    red = ds.test_images.float().mean(dim=(2, 3))
    red_index = int((red[:, 0] - red[:, 2]).argmax())
    assert ds.test_labels[red_index].item() == TINY_WNIDS.index("n09999999")
    # Grayscale JPEG decoded to three equal channels.
    gray = ds.train_images[1].float()
    assert torch.allclose(gray[0], gray[2], atol=2) and abs(gray.mean().item() - 128) < 3
    assert ds.autoaugment == "imagenet" and ds.mean == (0.4802, 0.4481, 0.3975)

    prepare_dataset("tinyimagenet", root=tmp_path, url=url, progress=False, expected=TINY_SMALL)
    assert server.total_hits == 1


def test_tinyimagenet_count_mismatch_fails_clearly(tmp_path: Path, server: FileServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.add("/tiny.zip", make_tiny_zip())
    with pytest.raises(DatasetError, match=r"classes: expected 3, found 2"):
        prepare_dataset("tinyimagenet", root=tmp_path, url=url, progress=False,
                        expected={**TINY_SMALL, "classes": 3})
    assert_nothing_prepared(tmp_path, "tinyimagenet")
    # The module defaults (the real dataset's counts) apply when nothing is overridden.
    with pytest.raises(DatasetError, match=r"expected 100000, found 4"):
        prepare_dataset("tinyimagenet", root=tmp_path, url=url, progress=False)
    assert_nothing_prepared(tmp_path, "tinyimagenet")
    monkeypatch.setattr(data_tinyimagenet, "TINYIMAGENET_EXPECTED", TINY_SMALL)
    prepare_dataset("tinyimagenet", root=tmp_path, url=url, progress=False)
    assert data.is_prepared("tinyimagenet", tmp_path)


def test_tinyimagenet_unsorted_folder_is_reported(tmp_path: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(make_tiny_zip())) as zf:
        zf.extractall(tmp_path)
    with pytest.raises(DatasetError, match="(?s)not yet prepared.*gmmvit prepare tinyimagenet"):
        load_dataset("tinyimagenet", root=tmp_path)
    # Preparing a hand-unpacked folder sorts it in place, without a download, and resumes a sort
    # that was interrupted after moving val_0.
    val = tmp_path / "tiny-imagenet-200" / "val"
    (val / TINY_WNIDS[1]).mkdir()
    (val / "images" / "val_0.JPEG").rename(val / TINY_WNIDS[1] / "val_0.JPEG")
    prepare_dataset("tinyimagenet", root=tmp_path, url="http://127.0.0.1:9/none.zip",
                    progress=False, expected=TINY_SMALL)
    assert (tmp_path / "tiny-imagenet-200" / "val" / TINY_WNIDS[1] / "val_0.JPEG").is_file()
    assert load_dataset("tinyimagenet", root=tmp_path, progress=False).test_labels.tolist() == [0, 1]


def test_expected_rejects_unknown_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trian"):
        prepare_dataset("tinyimagenet", root=tmp_path, expected={"trian": 4})


# --------------------------------------------------------------------------------------------
# folder


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_tree(root: Path, eval_split: str = "val") -> Path:
    colors = {"cat": (200, 0, 0), "dog": (0, 0, 200)}
    for cls, color in colors.items():
        for i, size in enumerate([(10, 12), (40, 30)]):
            _png(root / "train" / cls / f"{i}.png", color, size)
        _png(root / eval_split / cls / "x.PNG", color, (8, 8))
    (root / "train" / "cat" / "notes.txt").write_text("ignored: not an image")
    return root


@pytest.mark.parametrize("eval_split", ["val", "test"])
def test_folder_dataset_loads_png_tree(tmp_path: Path, eval_split: str) -> None:
    tree = make_tree(tmp_path / "pets", eval_split)
    ds = load_dataset("folder", root=tmp_path / "unused", path=tree, img_size=16, progress=False)
    assert ds.classes == ("cat", "dog") and ds.num_classes == 2
    assert ds.train_images.shape == (4, 3, 16, 16) and ds.test_images.shape == (2, 3, 16, 16)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.tolist() == [0, 0, 1, 1]
    assert ds.test_images[1, :, 5, 5].tolist() == [0, 0, 200]  # dog is blue
    assert ds.mean == pytest.approx((100 / 255, 0, 100 / 255), abs=1e-6)
    # the green channel never varies: std 1, not 0, or normalising would divide by zero
    assert ds.std == pytest.approx((100 / 255, 1, 100 / 255), abs=1e-6)
    assert ds.autoaugment == "imagenet"
    # path defaults to root; prepare only validates.
    assert load_dataset("folder", root=tree).img_size == 32
    assert prepare_dataset("folder", root=tree) == tree and data.is_prepared("folder", tree)


@pytest.mark.parametrize("breakage, message", [
    ("no-val", r"no val/ or test/"),
    ("no-train", r"no train/"),
    ("class-mismatch", r"class folders differ.*only in val/: bird"),
    ("no-images", r"no images in training class folder\(s\) cat"),
    ("not-a-dir", r"is not a directory"),
])
def test_folder_bad_layout_fails_clearly(tmp_path: Path, breakage: str, message: str) -> None:
    tree = make_tree(tmp_path / "pets")
    if breakage == "no-val":
        (tree / "val").rename(tree / "validation")
    elif breakage == "no-train":
        (tree / "train").rename(tree / "training")
    elif breakage == "class-mismatch":
        _png(tree / "val" / "bird" / "0.png", (0, 200, 0), (8, 8))
    elif breakage == "no-images":
        for png in (tree / "train" / "cat").glob("*.png"):
            png.unlink()
    else:
        tree = tmp_path / "missing"
    with pytest.raises(DatasetError, match=message):
        load_dataset("folder", path=tree)
    with pytest.raises(DatasetError, match=message):
        prepare_dataset("folder", root=tree)
    assert not data.is_prepared("folder", tree)


def test_folder_undecodable_image_names_file(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "pets")
    (tree / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("folder", path=tree, progress=False)


def test_folder_dataset_takes_a_name_of_your_own(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "pets")
    ds = load_dataset("folder", path=tree, img_size=8, progress=False, name="pets")
    assert ds.name == "pets" and ds.img_size == 8


# --------------------------------------------------------------------------------------------
# Messages a user can act on


UNREACHABLE = {"closed-port": "http://127.0.0.1:9", "unknown-host": "http://nonexistent.invalid"}
HAND_LAYOUT = {"cifar10": "data_batch_1", "cifar100": "meta", "svhn": "test_32x32.mat",
               "tinyimagenet": "val_annotations.txt"}


@pytest.mark.parametrize("host", UNREACHABLE.values(), ids=list(UNREACHABLE))
@pytest.mark.parametrize("name", DOWNLOADABLE)
def test_unreachable_source_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            name: str, host: str) -> None:
    monkeypatch.delenv(f"GMMVIT_{name.upper()}_URL", raising=False)
    spec = DATASETS[name]
    official = host + urllib.parse.urlparse(spec.url).path  # type: ignore[type-var]
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(spec, url=official))
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        prepare_dataset(name, root=root, progress=False)
    message = str(info.value)
    assert "failed" in message and host in message
    assert f"gmmvit prepare {name} --data-root {root} --url" in message  # a mirror or a local file
    assert f"GMMVIT_{name.upper()}_URL" in message
    assert str(root / spec.folder) in message and HAND_LAYOUT[name] in message  # type: ignore[operator]
    assert_nothing_prepared(root, name)


@pytest.mark.parametrize("name, archive", [
    ("cifar10", lambda: make_cifar10().archive), ("tinyimagenet", make_tiny_zip)],
    ids=["cifar10", "tinyimagenet"])
@pytest.mark.parametrize("where", ["server", "local-file"])
def test_cut_archive_says_incomplete_and_to_download_again(
        tmp_path: Path, server: FileServer, name: str, archive: Callable[[], bytes], where: str) -> None:
    whole = archive()
    cut = whole[: len(whole) * 2 // 3]
    file_name = "cifar-10-python.tar.gz" if name == "cifar10" else "tiny-imagenet-200.zip"
    if where == "server":
        source = server.add(f"/mirror/{file_name}", cut)  # a mirror that serves a partial file
    else:
        (tmp_path / "downloads").mkdir()
        (tmp_path / "downloads" / file_name).write_bytes(cut)
        source = str(tmp_path / "downloads" / file_name)
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        prepare_dataset(name, root=root, url=source, progress=False, expected=TINY_SMALL
                        if name == "tinyimagenet" else None)
    message = str(info.value)
    assert f"the archive {source} is incomplete or corrupt" in message
    assert "download it again" in message
    assert_nothing_prepared(root, name)


def test_class_mismatch_names_the_source_and_the_final_folder(tmp_path: Path,
                                                              server: FileServer) -> None:
    extra = {"train/n07777777/images/n07777777_0.JPEG": _jpeg(RED)}  # a class without val images
    url = server.add("/tiny-imagenet-200.zip", make_tiny_zip(extra))
    with pytest.raises(DatasetError) as info:
        prepare_dataset("tinyimagenet", root=tmp_path, url=url, progress=False, expected=TINY_SMALL)
    message = str(info.value)
    assert url in message and "n07777777" in message
    final = tmp_path / "tiny-imagenet-200"
    assert f"class folders differ between {final / 'train'} and {final / 'val'}" in message
    assert ".prepare-" not in message  # a temporary folder that no longer exists helps nobody
    assert_nothing_prepared(tmp_path, "tinyimagenet")


def test_cli_prepare_prints_verified_counts_and_log_lines(tmp_path: Path, server: FileServer,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from gmmvit import cli

    url = server.add("/cifar-10-python.tar.gz", make_cifar10().archive)
    assert cli.main(["prepare", "cifar10", "--data-root", str(tmp_path), "--url", url]) == 0
    out, err = capsys.readouterr()
    folder = tmp_path / "cifar-10-batches-py"
    assert f"cifar10 is ready in {folder}: 10 classes, 10 train, 3 test images (verified; from {url})" in out
    # stderr is not a terminal here, as in a Snakemake job log: one line, no progress bar redraws
    assert re.fullmatch(rf"downloading {re.escape(url)} \(0\.0 MB\) \.\.\. done in \d+ s\n", err), err


def test_decoding_progress_is_one_line_in_a_log_and_a_bar_on_a_terminal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tree = make_tree(tmp_path / "pets")
    monkeypatch.setattr(data_decode, "_MANY_FILES", 1)  # a bar even for these few files, on a terminal
    load_dataset("folder", path=tree, img_size=16, name="pets")
    err = capsys.readouterr().err
    assert "\r" not in err
    assert re.fullmatch(r"decoding pets train: 4 images at 16px \.\.\. done in \d+ s\n"
                        r"decoding pets test: 2 images at 16px \.\.\. done in \d+ s\n", err), err

    monkeypatch.setattr(data_decode, "on_terminal", lambda: True)
    load_dataset("folder", path=tree, img_size=12, name="pets")  # 16 px is now cached: decode 12
    err = capsys.readouterr().err
    assert "\r" in err and "decoding" not in err  # tqdm's bar, redrawn in place


# --------------------------------------------------------------------------------------------
# Named folder datasets through `gmmvit train`


def test_cli_train_decodes_a_named_folder_at_its_img_size(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from gmmvit import cli, train

    tree = tmp_path / "flowers"
    for split, n in (("train", 3), ("val", 1)):
        for cls, color in (("rose", (200, 0, 0)), ("iris", (80, 0, 200)), ("lily", (250, 250, 250))):
            for i in range(n):
                _png(tree / split / cls / f"{i}.png", color, (48, 48))
    given: dict[str, object] = {}

    def spy(cell, recipe, out_dir, **options):  # type: ignore[no-untyped-def]
        given.update(cell=cell, dataset=options.get("dataset"))  # training: tests/test_train.py
        return {}

    monkeypatch.setattr(train, "train_cell", spy)
    assert cli.main(["train", "--dataset", "flowers", "--dataset-kind", "folder", "--dataset-path",
                     str(tree), "--img-size", "40", "--model", "vit", "--recipe", "smoke",
                     "--numerics", "native", "--out", str(tmp_path / "out")]) == 0
    ds = given["dataset"]
    assert isinstance(ds, data.ImageDataset)
    assert ds.name == "flowers" and given["cell"].dataset == "flowers"  # type: ignore[attr-defined]
    assert ds.img_size == 40 and ds.train_images.shape == (9, 3, 40, 40)
    assert ds.classes == ("iris", "lily", "rose")

    # a registered dataset still loads with no dataset options
    assert cli.main(["train", "--dataset", "digits", "--model", "vit", "--recipe", "smoke",
                     "--numerics", "native", "--out", str(tmp_path / "out2")]) == 0
    assert given["dataset"].name == "digits" and given["dataset"].img_size == 32  # type: ignore[attr-defined]


def test_cli_train_unknown_name_suggests_folder_kind(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from gmmvit import cli

    assert cli.main(["train", "--dataset", "flowers", "--model", "vit", "--recipe", "smoke",
                     "--out", str(tmp_path / "out")]) == 2
    assert "--dataset-kind folder --dataset-path" in capsys.readouterr().err


# ---------------------------------------------------------------- the decoded-once cache


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("decoded the image files although a current cache exists")

    monkeypatch.setattr(data_decode, "decode_images", refuse)


def test_tinyimagenet_prepare_writes_the_decoded_cache(tmp_path: Path, server: FileServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.add("/tiny-imagenet-200.zip", make_tiny_zip())
    folder = prepare_dataset("tinyimagenet", root=tmp_path, url=url, progress=False,
                             expected=TINY_SMALL)
    cache = folder / data.CACHE_DIR / "64px"
    assert {p.name for p in cache.iterdir()} == {
        "cache.json", "train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy"}
    _no_decoding(monkeypatch)  # training jobs read the arrays; they decode nothing
    ds = load_dataset("tinyimagenet", root=tmp_path, progress=False)
    assert ds.train_images.shape == (4, 3, 64, 64) and ds.train_labels.tolist() == [0, 0, 1, 1]
    assert np.load(cache / "train_images.npy", mmap_mode="r").shape == (4, 3, 64, 64)


def test_folder_cache_is_used_when_current_and_rebuilt_when_not(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(tmp_path / "pets")
    first = load_dataset("folder", root=tree, img_size=16, progress=False)
    cache = tree / data.CACHE_DIR / "16px"
    assert (cache / "cache.json").is_file()
    decode = data_decode.decode_images
    calls: list[int] = []

    def counting(paths, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(paths))
        return decode(paths, *args, **kwargs)

    monkeypatch.setattr(data_decode, "decode_images", counting)
    stats = data_cache.channel_stats
    passes: list[int] = []  # full passes over the training images to normalise them

    def counting_stats(images):  # type: ignore[no-untyped-def]
        passes.append(len(images))
        return stats(images)

    for computes_stats in (data_cache, data_folder):  # the cache's facts, and a folder without them
        monkeypatch.setattr(computes_stats, "channel_stats", counting_stats)

    def load() -> data.ImageDataset:
        return load_dataset("folder", root=tree, img_size=16, progress=False)

    again = load()  # current: read back, nothing decoded, the very same arrays
    assert calls == [] and torch.equal(again.train_images, first.train_images)
    # The channel mean and std are stored with the cache, equal to a pass over the images.
    assert passes == [] and (again.mean, again.std) == (first.mean, first.std) == stats(first.train_images)
    assert torch.equal(again.test_labels, first.test_labels) and again.classes == first.classes
    # The fingerprint stored with the cache is the one the arrays hash to (not hashed again).
    arrays = (again.train_images, again.train_labels, again.test_images, again.test_labels)
    assert again.known_fingerprint == data.fingerprint_arrays(arrays) == first.fingerprint()
    # Memory-mapped copy-on-write: a job may write into its tensors; the cache file does not change.
    again.train_images[0] = 255
    assert torch.equal(load().train_images, first.train_images) and calls == []
    load_dataset("folder", root=tree, img_size=8, progress=False)  # another size: its own cache
    assert calls == [4, 2] and (tree / data.CACHE_DIR / "8px" / "cache.json").is_file()
    assert passes == [4]  # one pass, to store the new cache's facts

    calls.clear()  # stale: an image added
    _png(tree / "train" / "dog" / "new.png", (0, 0, 90), (16, 16))
    assert load().train_images.shape[0] == 5 and calls == [5, 2]
    calls.clear()  # stale: an image rewritten in place (new mtime)
    os.utime(tree / "train" / "cat" / "0.png", ns=(1, 1))
    load()
    assert calls == [5, 2]
    calls.clear()  # partial: a job killed before cache.json, the last file, was written
    (cache / "cache.json").unlink()
    load()
    assert calls == [5, 2]
    calls.clear()  # foreign: arrays that do not fit the tree they claim to be
    np.save(cache / "train_images.npy", np.zeros((5, 3, 4, 4), dtype=np.uint8))
    assert load().train_images.shape == (5, 3, 16, 16) and calls == [5, 2]
    calls.clear()
    expected = load().train_images.clone()  # a copy: the mapping would show the in-place rewrite
    assert calls == []
    # Tampered: an array rewritten after the cache was (same shape, other pixels): its size and
    # mtime no longer match cache.json, so it is rebuilt, and its fingerprint is never trusted.
    np.save(cache / "train_images.npy", np.zeros((5, 3, 16, 16), dtype=np.uint8))
    rebuilt = load()
    assert calls == [5, 2] and torch.equal(rebuilt.train_images, expected)
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["format"] == data_cache.CACHE_FORMAT
    earlier = [{"key": meta["key"], "format": 1},  # format 1: no stats, no fingerprint
               {k: v for k, v in meta.items() if k not in ("mean", "std")} | {"format": 2}]
    # The current format with one fact missing or malformed (a hand edit): never trusted either.
    damaged = [{k: v for k, v in meta.items() if k != "fingerprint"}, meta | {"std": [0.5, 0.5]},
               meta | {"mean": "0.5"}]
    for broken in earlier + damaged:
        calls.clear()
        (cache / "cache.json").write_text(json.dumps(broken))
        rebuilt = load()
        assert calls == [5, 2], broken
        assert json.loads((cache / "cache.json").read_text()) | {"arrays": None} == \
            meta | {"arrays": None}  # the same key, facts and format as before (new files)
        assert torch.equal(rebuilt.train_images, expected) and rebuilt.known_fingerprint == meta["fingerprint"]


def _prepare_cifar_or_svhn(name: str, root: Path, server: FileServer) -> tuple[Path, np.ndarray]:
    """Prepare ``name`` from the test server; returns its folder and its training images (N, 3, 32, 32)."""
    if name == "svhn":
        train_mat, train_x = make_svhn_mat([10, 1, 3], seed=0)
        server.add("/h/train_32x32.mat", train_mat)
        server.add("/h/test_32x32.mat", make_svhn_mat([5], seed=1)[0])
        return prepare_dataset("svhn", root=root, url=server.base + "/h/", progress=False), \
            train_x.transpose(3, 2, 0, 1)
    cifar = make_cifar10() if name == "cifar10" else make_cifar100()
    url = server.add(f"/{name}.tar.gz", cifar.archive)
    return prepare_dataset(name, root=root, url=url, progress=False), cifar.train_images


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_cifar_and_svhn_load_from_the_cache_prepare_writes(tmp_path: Path, server: FileServer,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           name: str) -> None:
    folder, train_images = _prepare_cifar_or_svhn(name, tmp_path, server)
    assert (folder / data.CACHE_DIR / "32px" / "cache.json").is_file()
    spec_type = type(DATASETS[name])
    read = spec_type._read
    reads: list[str] = []

    def counting(self, *args):  # type: ignore[no-untyped-def]
        reads.append(name)
        return read(self, *args)

    monkeypatch.setattr(spec_type, "_read", counting)
    ds = load_dataset(name, root=tmp_path)  # from the cache: the source files are not read
    assert reads == [] and torch.equal(ds.train_images, torch.from_numpy(train_images))
    assert ds.known_fingerprint == data.fingerprint_arrays(
        (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels))
    # A source file replaced (here: touched) makes the cache stale: read again, with the same data.
    source = folder / DATASETS[name].expected_files()[0]
    os.utime(source, ns=(1, 1))
    again = load_dataset(name, root=tmp_path)
    assert reads and torch.equal(again.train_images, ds.train_images)
    assert again.fingerprint() == ds.fingerprint()
