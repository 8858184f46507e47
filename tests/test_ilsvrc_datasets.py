"""mini-ImageNet and tiered-ImageNet built from ILSVRC-2012's training images
(``fewbench data import miniimagenet|tieredimagenet SOURCE``), on generated files in ILSVRC's
layout: the outer tar (MD5-checked), a folder of class tars, a folder of class folders. The
shipped split lists are checked against the published files; the mapping from a Ravi CSV name
to an ILSVRC file is checked on numbers whose text order differs from their numeric order."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image

from fewbench.data.root import import_path
from fewbench.errors import DataError
from fewbench_plugins.datasets import ilsvrc, miniimagenet, tieredimagenet
from fewbench_plugins.datasets.miniimagenet import MiniImageNet
from fewbench_plugins.datasets.tieredimagenet import TieredImageNet, class_lists

# ILSVRC numbers of each generated class's files: text order (100, 28, 3, 6) is not numeric.
NUMBERS = (28, 3, 100, 6, 41)


def jpeg(level: int, size=(30, 20)) -> bytes:
    """A solid grey JPEG whose level names the file it came from."""
    out = io.BytesIO()
    Image.new("RGB", size, (level, level, level)).save(out, format="JPEG", quality=100)
    return out.getvalue()


def level_of(number: int) -> int:
    return 5 * number % 250


def make_ilsvrc(base, wnids, form):
    """ILSVRC-2012's training set for ``wnids`` in one of its forms; returns the path."""
    if form == "folders":
        for wnid in wnids:
            (base / wnid).mkdir(parents=True)
            for n in NUMBERS:
                (base / wnid / f"{wnid}_{n}.JPEG").write_bytes(jpeg(level_of(n)))
        return base
    tars = {}
    for wnid in wnids:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for n in NUMBERS:
                data = jpeg(level_of(n))
                info = tarfile.TarInfo(f"{wnid}_{n}.JPEG")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        tars[wnid] = buffer.getvalue()
    base.mkdir(parents=True)
    if form == "class tars":
        for wnid, data in tars.items():
            (base / f"{wnid}.tar").write_bytes(data)
        return base
    outer = base / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer, "w") as archive:
        for wnid, data in tars.items():
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return outer


RAVI = {  # split -> (wnid, positions named in the CSV)
    "train": [("n01000001", (1, 3)), ("n01000002", (2, 5))],
    "val": [("n01000003", (4, 1))],
    "test": [("n01000004", (5, 2))],
}


@pytest.fixture
def small_ravi_split(monkeypatch):
    """A Ravi split of four generated classes in place of the shipped 100."""
    texts = {
        f"ravi/{split}.csv": (
            "filename,label\n"
            + "".join(f"{w}{p:08d}.jpg,{w}\n" for w, positions in rows for p in positions)
        ).encode()
        for split, rows in RAVI.items()
    }
    monkeypatch.setattr(ilsvrc, "split_bytes", texts.__getitem__)
    monkeypatch.setattr(miniimagenet, "STANDARD", {s: len(r) for s, r in RAVI.items()})
    return [w for rows in RAVI.values() for w, _ in rows]


@pytest.mark.parametrize("form", ["folders", "class tars", "outer tar"])
def test_mini_imagenet_takes_the_ravi_position_in_numeric_order(tmp_path, monkeypatch, form, small_ravi_split):  # fmt: skip
    source = make_ilsvrc(tmp_path / "ilsvrc", small_ravi_split, form)
    if form == "outer tar":
        monkeypatch.setattr(ilsvrc, "TRAIN_TAR_MD5", hashlib.md5(source.read_bytes()).hexdigest())
    assert MiniImageNet.builds_from(source)
    folder = import_path(MiniImageNet, tmp_path / "root", source)
    by_number = sorted(NUMBERS)  # 3, 6, 28, 41, 100: the tools' numeric order
    for rows in RAVI.values():
        for wnid, positions in rows:
            for p in positions:
                with Image.open(folder / "images" / f"{wnid}{p:08d}.jpg") as image:
                    assert image.size == (84, 84)
                    pixels = np.asarray(image).astype(int)
                assert abs(pixels.mean() - level_of(by_number[p - 1])) < 2, (wnid, p)
    assert (folder / "splits" / "ravi" / "val.csv").read_text() == "filename,label\n" + (
        "n0100000300000004.jpg,n01000003\nn0100000300000001.jpg,n01000003\n"
    )
    sizes = MiniImageNet().split_sizes(tmp_path / "root")
    assert (sizes["train"].classes, sizes["train"].examples_per_class) == (2, 2)


def test_an_outer_tar_that_is_not_the_official_one_installs_nothing(tmp_path, small_ravi_split):
    source = make_ilsvrc(tmp_path / "ilsvrc", small_ravi_split, "outer tar")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    with pytest.raises(DataError, match=f"MD5 {md5}, not ILSVRC2012_img_train.tar's 1d675b47"):
        import_path(MiniImageNet, tmp_path / "root", source)
    assert not (tmp_path / "root" / "miniimagenet").exists()
    assert not [p for p in (tmp_path / "root").iterdir() if p.name.startswith(".incoming")]


def test_a_source_lacking_classes_of_the_shipped_split_says_which(tmp_path):
    """The real shipped lists: a source with three of mini-ImageNet's 100 classes."""
    wnids = sorted(class_of_ravi())[:3]
    source = make_ilsvrc(tmp_path / "ilsvrc", wnids, "folders")
    with pytest.raises(DataError, match=r"lacks 97 of the 100 classes needed, n\d{8} first"):
        import_path(MiniImageNet, tmp_path / "root", source)
    assert not (tmp_path / "root" / "miniimagenet").exists()
    done = run_cli("data", "import", "tieredimagenet", str(source), "--data-root",
                   str(tmp_path / "root"))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    tiered = set()
    for split in ("train", "val", "test"):
        tiered |= set(class_lists(ilsvrc.split_bytes(f"tiered/{split}.csv").decode(), split))
    lacking = len(tiered - set(wnids))
    assert done.stderr.strip().splitlines() == [
        f"fewbench: error: {source} lacks {lacking} of the 608 classes needed, n01440764 first "
        "(neither n01440764/ nor n01440764.tar)"
    ]


def class_of_ravi() -> set[str]:
    labels = set()
    for split in ("train", "val", "test"):
        text = ilsvrc.split_bytes(f"ravi/{split}.csv").decode()
        labels |= {line.split(",")[1] for line in text.splitlines()[1:]}
    return labels


def test_the_shipped_ravi_csvs_are_the_published_files(data_root):
    for split in ("train", "val", "test"):
        published = data_root / "miniimagenet" / "splits" / "ravi" / f"{split}.csv"
        if not published.is_file():
            pytest.skip(f"{published} is not here")
        assert ilsvrc.split_bytes(f"ravi/{split}.csv") == published.read_bytes()
    assert len(class_of_ravi()) == 100


def test_the_shipped_tiered_lists_have_the_papers_counts_and_an_edit_is_refused(tmp_path, monkeypatch):  # fmt: skip
    lists = {
        s: class_lists(ilsvrc.split_bytes(f"tiered/{s}.csv").decode(), s)
        for s in ("train", "val", "test")
    }
    assert {s: len(c) for s, c in lists.items()} == {"train": 351, "val": 97, "test": 160}
    assert {s: len(set(c.values())) for s, c in lists.items()} == {"train": 20, "val": 6, "test": 8}
    classes = [set(c) for c in lists.values()]
    categories = [set(c.values()) for c in lists.values()]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not classes[i] & classes[j] and not categories[i] & categories[j]
    edited = tmp_path / "tiered"
    edited.mkdir()
    for s in ("train", "val", "test"):
        (edited / f"{s}.csv").write_bytes(ilsvrc.split_bytes(f"tiered/{s}.csv"))
    (edited / "val.csv").write_text((edited / "val.csv").read_text().replace("n0", "n1", 1))
    monkeypatch.setattr(ilsvrc, "SPLITS_FOLDER", tmp_path)
    with pytest.raises(DataError, match="val.csv: not the published split file"):
        ilsvrc.split_bytes("tiered/val.csv")


def test_area_resizing_averages_whole_blocks_and_cubic_keeps_a_constant():
    pixels = np.random.default_rng(0).integers(0, 256, (168, 168, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    area = np.asarray(ilsvrc.resized(out.getvalue(), 84, "area", "x")).astype(float)
    blocks = pixels.reshape(84, 2, 84, 2, 3).astype(float).mean(axis=(1, 3))
    # Each pixel the mean of its 2x2 block, to PIL's fixed-point rounding (one level).
    assert np.abs(area - blocks).max() <= 1
    flat = np.asarray(ilsvrc.resized(jpeg(77, size=(123, 45)), 84, "cubic", "x"))
    assert flat.shape == (84, 84, 3) and np.abs(flat.astype(int) - 77).max() <= 1
    with pytest.raises(DataError, match="x is not a readable image"):
        ilsvrc.resized(b"not an image", 84, "cubic", "x")


TIERED = {"train": ["n02000002", "n02000001"], "val": ["n02000003"], "test": ["n02000004"]}


@pytest.mark.parametrize("form", ["folders", "outer tar"])
def test_tiered_imagenet_keeps_every_image_by_number(tmp_path, monkeypatch, form):
    texts = {
        f"tiered/{s}.csv": "".join(f"{w},n0900000{i}\n" for w in wnids).encode()
        for i, (s, wnids) in enumerate(TIERED.items())
    }
    monkeypatch.setattr(ilsvrc, "split_bytes", texts.__getitem__)
    monkeypatch.setattr(tieredimagenet, "STANDARD", {s: len(w) for s, w in TIERED.items()})
    source = make_ilsvrc(tmp_path / "ilsvrc", [w for ws in TIERED.values() for w in ws], form)
    if form == "outer tar":
        monkeypatch.setattr(ilsvrc, "TRAIN_TAR_MD5", hashlib.md5(source.read_bytes()).hexdigest())
    folder = import_path(TieredImageNet, tmp_path / "root", source)
    assert sorted(p.name for p in (folder / "images" / "n02000001").iterdir()) == sorted(
        f"n02000001_{n}.png" for n in NUMBERS
    )
    dataset = TieredImageNet(normalize=False)
    sizes = dataset.split_sizes(tmp_path / "root")
    assert (sizes["train"].classes, sizes["train"].examples_per_class) == (2, len(NUMBERS))
    pools = dataset.load(tmp_path / "root", tmp_path / "cache")
    train = pools["train"].images
    assert train.shape == (2, len(NUMBERS), 3, 84, 84)
    levels = train.float().mean(dim=(2, 3, 4))[0].tolist()  # n02000001: classes by wnid
    expected = [level_of(n) for n in sorted(NUMBERS)]
    assert np.allclose(levels, expected, atol=2), (levels, expected)
    ids = dataset.example_ids(tmp_path / "root", "train")
    assert ids[0][:2] == ["tieredimagenet/images/n02000001/n02000001_3.png",
                          "tieredimagenet/images/n02000001/n02000001_6.png"]  # fmt: skip
    assert TieredImageNet.verify(folder) == []
    again = dataset.load(tmp_path / "root", tmp_path / "cache")["train"].images  # from the cache
    assert np.array_equal(again.numpy(), train.numpy())
