"""The BSCD-FSL targets (CropDiseases, EuroSAT, ISIC, ChestX) from generated files in the
layouts the benchmark's code reads: classes and their order, labels from the CSVs (one-hot
rows, single findings), the benchmark's test transform, test-only splits (training on one is
refused in one line), and a model trained on mini-ImageNet tested on EuroSAT end to end."""

from __future__ import annotations

import csv
import sqlite3

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image
from test_miniimagenet import make_images

from fewbench.errors import DataError, SuiteError
from fewbench.registry import Registry
from fewbench.suite.loading import load_suite_file
from fewbench_plugins.datasets.bscd import (
    CHESTX_CLASSES,
    IMAGENET_MEAN,
    ISIC,
    ChestX,
    CropDiseases,
    EuroSAT,
    benchmark_square,
)


def save(path, pixels, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode=None if mode == "RGB" else mode).save(path)


def bright(rng, shape):
    return rng.integers(100, 256, shape, dtype=np.uint8)  # padding (zeros) would show


def make_eurosat(root, per_class=(4, 3, 5, 4, 3, 4, 3, 5, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    names = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
             "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]  # fmt: skip
    for name, count in zip(names, per_class, strict=True):
        for i in range(count):
            save(root / "eurosat" / "2750" / name / f"{name}_{i + 1}.jpg", bright(rng, (64, 64, 3)))
    return names


def test_eurosat_classes_in_folder_order_by_the_benchmarks_transform(tmp_path):
    names = make_eurosat(tmp_path)
    dataset = EuroSAT(image_size=16, normalize="imagenet")
    sizes = dataset.split_sizes(tmp_path)
    assert set(sizes) == {"test"} and (sizes["test"].classes, sizes["test"].examples_per_class) == (
        10,
        3,
    )
    pool = dataset.load(tmp_path, tmp_path / "cache")["test"]
    assert pool.images.shape == (10, 5, 3, 16, 16) and pool.counts.tolist()[:3] == [4, 3, 5]
    first = tmp_path / "eurosat" / "2750" / names[0] / f"{names[0]}_1.jpg"
    with Image.open(first) as image:
        assert np.array_equal(pool.images[0, 0].numpy(), benchmark_square(image, 16))
    torch.testing.assert_close(pool.mean, torch.tensor(IMAGENET_MEAN))
    # Episodes never draw the padding of the smaller classes.
    batch = pool.sample_episodes(50, 5, 1, 2, torch.Generator().manual_seed(0))
    raw = torch.cat([batch.support_x, batch.query_x], 1) * pool.std.view(3, 1, 1) + pool.mean.view(
        3, 1, 1
    )
    assert raw.amin(dim=(2, 3, 4)).min() > 0.2
    assert EuroSAT.verify(tmp_path / "eurosat") == [
        "eurosat: found 10 classes and 38 images, expected 10 classes and 27000 images"
    ]


def test_cropdiseases_reads_dataset_train_and_counts_38_classes(tmp_path):
    rng = np.random.default_rng(1)
    for c in range(38):
        for i in range(2):
            save(tmp_path / "cropdiseases" / "dataset" / "train" / f"Plant___{c:02d}" / f"{i}.JPG",
                 bright(rng, (40, 30, 3)))  # fmt: skip
    assert CropDiseases.verify(tmp_path / "cropdiseases") == []
    pool = CropDiseases(image_size=12).load(tmp_path, tmp_path / "cache")["test"]
    assert pool.num_classes == 38 and pool.images.shape[1:] == (2, 3, 12, 12)
    (tmp_path / "cropdiseases" / "dataset" / "train" / "Plant___00" / "0.JPG").write_bytes(b"x")
    assert "not a readable image" in CropDiseases.verify(tmp_path / "cropdiseases")[0]


ISIC_ROWS = [("ISIC_0000", 1), ("ISIC_0001", 0), ("ISIC_0002", 1), ("ISIC_0003", 6),
             ("ISIC_0004", 2), ("ISIC_0005", 3), ("ISIC_0006", 4), ("ISIC_0007", 5),
             ("ISIC_0008", 1)]  # fmt: skip


def make_isic(root, rows=ISIC_ROWS):
    rng = np.random.default_rng(2)
    base = root / "isic"
    truth = base / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    truth.parent.mkdir(parents=True)
    with open(truth, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"])
        for image, label in rows:
            writer.writerow([image] + ["1.0" if i == label else "0.0" for i in range(7)])
    for image, _ in rows:
        save(base / "ISIC2018_Task3_Training_Input" / f"{image}.jpg", bright(rng, (45, 60, 3)))
    return truth


def test_isic_labels_are_the_one_hot_column_in_the_benchmarks_order(tmp_path):
    truth = make_isic(tmp_path)
    files = ISIC(image_size=8).class_files(tmp_path / "isic")
    assert [len(f) for f in files] == [1, 3, 1, 1, 1, 1, 1]  # MEL, NV (three), BCC, ...
    assert files[6][0].endswith("ISIC_0003.jpg")  # VASC, the last column
    assert ISIC.verify(tmp_path / "isic")[0].endswith("expected 7 classes and 10015 images")
    lines = truth.read_text().splitlines()
    truth.write_text("\n".join([*lines, "ISIC_0009,1.0,1.0,0.0,0.0,0.0,0.0,0.0"]) + "\n")
    with pytest.raises(DataError, match=r"GroundTruth.csv:11: not a one-hot row"):
        ISIC().class_files(tmp_path / "isic")


def test_chestx_keeps_single_findings_of_the_seven_classes(tmp_path):
    rng = np.random.default_rng(3)
    base = tmp_path / "chestx"
    rows = [("a.png", "Atelectasis"), ("b.png", "Effusion|Mass"), ("c.png", "No Finding"),
            ("d.png", "Pneumonia"), ("e.png", "Pneumothorax"), ("f.png", "Mass"),
            ("g.png", "Cardiomegaly"), ("h.png", "Effusion"), ("i.png", "Infiltration"),
            ("j.png", "Nodule"), ("k.png", "Atelectasis")]  # fmt: skip
    base.mkdir()
    with open(base / "Data_Entry_2017.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
        for image, findings in rows:
            writer.writerow([image, findings, 0, 1])
            save(base / "images" / image, bright(rng, (300, 300)), mode="L")
    files = ChestX(image_size=8).class_files(base)
    kept = {CHESTX_CLASSES[c]: [f.rsplit("/", 1)[1] for f in row] for c, row in enumerate(files)}
    assert kept == {"Atelectasis": ["a.png", "k.png"], "Cardiomegaly": ["g.png"],
                    "Effusion": ["h.png"], "Infiltration": ["i.png"], "Mass": ["f.png"],
                    "Nodule": ["j.png"], "Pneumothorax": ["e.png"]}  # fmt: skip
    assert ChestX.verify(base) == []
    pool = ChestX(image_size=8, normalize="none").load(tmp_path, tmp_path / "cache")["test"]
    with Image.open(base / "images" / "a.png") as image:
        expected = benchmark_square(image.resize((256, 256), resample=Image.BILINEAR), 8)
    assert np.array_equal(pool.images[0, 0].numpy(), expected)
    assert pool.images.shape[2] == 3  # grey copied into three channels


SUITE = """\
name: bscd
datasets: [{{name: {train}, image_size: 28}}]
tasks: {{ways: 2, shots: 1, query: 1}}
backbones: [{{name: conv4, hidden: 4}}]
learners: [{{name: protonet}}]
train: {{iterations: 2, validate_every: 2, val_episodes: 2}}
eval: {{episodes: 4, query: 1{test}}}
"""


def test_training_on_a_target_is_refused_and_testing_on_it_runs(tmp_path):
    make_eurosat(tmp_path / "root")
    suite = tmp_path / "own.yaml"
    suite.write_text(SUITE.format(train="eurosat", test=""))
    from fewbench.data.check import expand_and_check

    with pytest.raises(SuiteError, match="eurosat has no training split, only test classes"):
        expand_and_check(load_suite_file(suite), Registry(), tmp_path / "root")
    make_images(tmp_path / "root")
    suite.write_text(
        SUITE.format(train="miniimagenet", test=", dataset: {name: eurosat, image_size: 28}")
    )
    done = run_cli(
        "run", str(suite), "--data-root", str(tmp_path / "root"), "--out", str(tmp_path / "run"),
        "--no-progress", "--device", "cpu", env={"FEWBENCH_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    db = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    assert db.execute("SELECT label, status FROM cells").fetchall() == [
        ("miniimagenet->eurosat/2w1s/conv4/protonet/seed0", "done")
    ]
