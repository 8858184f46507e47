"""Fuzzing the surfaces of issue 29: numeric settings (NaN, infinity, overflow), model files
received from elsewhere, the plugin index file, and export destinations. Every case ends
in a result or in one clear line (a FewbenchError, exit 2), never a traceback, a hang or
lost data."""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hardening_suite import SINUSOID, TINY, assert_one_line_error, bounded_main

import fewbench
from fewbench.cli import plugin_index
from fewbench.cli.parser import main
from fewbench.errors import FewbenchError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))

# -- numeric settings ------------------------------------------------------------------------

NUMERIC_KEYS = [
    "learners.maml.inner_lr", "learners.maml.meta_lr", "learners.finetune.lr",
    "train.iterations", "train.checkpoint_minutes", "eval.episodes", "tasks.query",
]  # fmt: skip
NON_FINITE = [".nan", ".NaN", "nan", ".inf", "-.inf", "inf", "1e400", "-1e400", "NaN", "-Infinity"]


@FUZZ
@given(
    key=st.sampled_from(NUMERIC_KEYS),
    value=st.one_of(
        st.sampled_from(NON_FINITE),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-(10**20), 10**20).map(str),
    ),
)
def test_a_numeric_setting_is_finite_or_refused_in_one_line(key, value):
    """NaN passed every minimum (NaN < min is false) and stored cells as done at chance."""
    with tempfile.TemporaryDirectory() as folder:
        suite = Path(folder) / "suite.yaml"
        suite.write_text(SINUSOID)
        code, stderr = bounded_main(
            ["run", str(suite), "--dry-run", "--data-root", folder, f"--set={key}={value}"]
        )
    parsed = float(value.replace(".nan", "nan").replace(".inf", "inf").replace(".NaN", "nan"))
    if not math.isfinite(parsed) or code != 0:
        assert_one_line_error(code, stderr)


# -- model files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-model")
    (folder / "tiny.yaml").write_text(TINY)
    run_dir = fewbench.run(folder / "tiny.yaml", out=folder / "run", data_root=folder, device="cpu")
    (path,) = (run_dir / "checkpoints").glob("*/best.pt")
    return path


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(), st.text(max_size=6),
    st.lists(st.integers(-3, 10**7), max_size=3), st.just({}), st.just({"x": torch.zeros(2)}),
    st.just(torch.zeros(3, 2)),
)  # fmt: skip


def _paths(value, prefix=()):
    """Every (path, value) of a nested record, tensors as leaves."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


@pytest.mark.filterwarnings("ignore")
@FUZZ
@given(data=st.data())
def test_a_mutated_model_file_loads_or_is_one_fewbench_error(model_file, data):
    """Crafted model files raised EOFError, UnpicklingError, KeyError or TypeError, or asked
    for terabytes; any mutation of a good one now loads or is one FewbenchError."""
    record = torch.load(model_file, weights_only=True)
    paths = [p for p, _ in _paths(record) if p]
    edits = data.draw(st.lists(st.tuples(st.sampled_from(paths), JUNK), min_size=1, max_size=3))
    for path, new in edits:
        try:
            record = _replaced(record, path, new)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed the place
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "model.pt"
        if data.draw(st.booleans()):
            torch.save(record, target)
        else:  # raw bytes: cut, flipped
            raw = bytearray(model_file.read_bytes())
            cut = data.draw(st.integers(0, len(raw)))
            raw = raw[:cut]
            if raw and data.draw(st.booleans()):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0xFF
            target.write_bytes(bytes(raw))
        try:
            fewbench.load_learner(target)
        except FewbenchError as exc:
            assert "\n" not in str(exc)


# -- the plugin index file ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def index_listing(tmp_path_factory):
    """``fewbench plugins`` as the registry gives it, and the stored index it leaves."""
    cache = tmp_path_factory.mktemp("fuzz-index")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWBENCH_CACHE", str(cache))
        patch.delenv(plugin_index.DISABLE_ENV, raising=False)
        code, _ = bounded_main(["plugins"])
        assert code == 0
        payload = json.loads(plugin_index.index_path().read_text())
    return cache, payload


@FUZZ
@given(data=st.data())
def test_a_tampered_index_file_never_changes_the_listing(index_listing, data, capsys):
    """Whatever an index file holds, `fewbench plugins` lists what is installed."""
    cache, payload = index_listing
    paths = [p for p, _ in _paths(payload) if p]
    edits = data.draw(st.lists(st.tuples(st.sampled_from(paths), JUNK), min_size=1, max_size=3))
    for path, new in edits:
        try:
            payload = _replaced(payload, path, new if not isinstance(new, torch.Tensor) else None)
        except (KeyError, IndexError, TypeError):
            continue
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWBENCH_CACHE", str(cache))
        patch.delenv(plugin_index.DISABLE_ENV, raising=False)
        capsys.readouterr()
        assert main(["plugins", "--refresh"]) == 0
        expected = capsys.readouterr().out
        text = json.dumps(payload, default=lambda _: None)
        plugin_index.index_path().write_text(text if data.draw(st.booleans()) else text[:-7])
        assert main(["plugins"]) == 0
        assert capsys.readouterr().out == expected


# -- export destinations -----------------------------------------------------------------------


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


DESTINATIONS = ["new.pt", "run", "run/results.sqlite", "run/x.pt", "run/checkpoints/x.pt",
                "existing.pt", "missing/x.pt", "existing.pt/x.pt", "", ".", "/dev/null",
                "/proc/x.pt", "sub/../new.pt", "é\u202e.pt", "line\nbreak.pt", "SOURCE"]  # fmt: skip


@FUZZ
@given(destination=st.sampled_from(DESTINATIONS), force=st.booleans())
def test_export_writes_a_model_or_one_line_and_never_touches_the_run(
    model_file, tmp_path_factory, destination, force
):
    """`export -o RUN/results.sqlite` destroyed the store; now any destination either gets
    the model or one line, and the run directory is byte for byte the same."""
    run_dir = model_file.parent.parent.parent
    before = _tree_digest(run_dir)
    work = tmp_path_factory.mktemp("export")
    (work / "existing.pt").write_text("keep me")
    if destination == "SOURCE":
        target = model_file
    elif destination.startswith("run"):
        target = run_dir / destination[3:].lstrip("/")
    elif destination.startswith("/"):
        target = Path(destination)
    else:
        target = work / destination
    code, stderr = bounded_main(
        ["export", str(run_dir), "-o", str(target), *(["--force"] if force else [])]
    )
    if code == 0:
        assert target.read_bytes() == model_file.read_bytes()
    else:
        assert_one_line_error(code, stderr)
        if destination == "existing.pt":
            assert (work / "existing.pt").read_text() == "keep me"
    assert _tree_digest(run_dir) == before
