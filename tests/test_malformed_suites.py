"""Property test: every malformed suite gives one clear error line, exit code 2, no run directory."""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import pytest
import yaml
from helpers import registry_built_once
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fewbench.cli.parser import main
from fewbench.suite.loading import REQUIRED, TOP_LEVEL

VALID = {
    "name": "prop",
    "seeds": [0],
    "datasets": [{"name": "omniglot", "split": "vinyals", "image_size": 28}],
    "tasks": {"ways": 5, "shots": 1, "query": 1},
    "backbones": [{"name": "conv4", "hidden": 8}],
    "learners": [{"name": "maml", "meta_batch_size": 2}, {"name": "finetune"}],
    "train": {"iterations": 2, "validate_every": 1, "val_episodes": 2},
    "eval": {"episodes": 2, "query": 1},
}
INT_SETTINGS = [
    ("train", "iterations"),
    ("train", "validate_every"),
    ("eval", "episodes"),
    ("eval", "query"),
    ("tasks", "query"),
    ("learners", 0, "meta_batch_size"),
    ("backbones", 0, "hidden"),
]
NOT_AN_INTEGER = st.one_of(
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.floats(allow_nan=False, allow_infinity=True).filter(
        lambda x: x != int(x) if abs(x) < 1e300 else True
    ),
    st.booleans(),
    st.integers(max_value=-1),
)


@pytest.fixture(scope="module", autouse=True)
def one_registry():
    with registry_built_once():
        yield


def is_axis(value) -> bool:
    """A non-empty list of distinct positive integers: a valid expansion of a plugin parameter."""
    return (
        isinstance(value, list)
        and bool(value)
        and len(set(value)) == len(value)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    )


def set_path(suite: dict, path: tuple, value) -> None:
    target = suite
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


@st.composite
def malformed(draw) -> str:
    suite = copy.deepcopy(VALID)
    kind = draw(
        st.sampled_from(
            [
                "missing",
                "unknown_key",
                "wrong_type",
                "plugin_name",
                "plugin_param",
                "too_many_ways",
                "too_many_shots",
                "broken_yaml",
                "bad_name",
                "not_mapping",
            ]
        )
    )
    if kind == "missing":
        del suite[draw(st.sampled_from(REQUIRED))]
    elif kind == "unknown_key":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in TOP_LEVEL))
        suite[key] = draw(st.one_of(st.integers(), st.text(max_size=10)))
    elif kind == "wrong_type":
        path = draw(st.sampled_from(INT_SETTINGS))
        # A list of valid values given for a plugin parameter is a legal grid axis, not an error.
        legal_axis = path[0] in ("learners", "backbones")
        set_path(
            suite, path, draw(NOT_AN_INTEGER.filter(lambda v: not (legal_axis and is_axis(v))))
        )
    elif kind == "plugin_name":
        section = draw(st.sampled_from(["datasets", "backbones", "learners"]))
        suite[section][0]["name"] = draw(
            st.text(max_size=15).filter(
                lambda n: n not in {"omniglot", "conv4", "mlp", "maml", "fomaml", "finetune"}
            )
        )
    elif kind == "plugin_param":
        key = draw(
            st.text(min_size=1, max_size=12).filter(
                lambda k: (
                    k
                    not in {
                        "name",
                        "inner_lr",
                        "inner_steps",
                        "eval_inner_steps",
                        "meta_batch_size",
                        "meta_lr",
                        "first_order",
                        "engine",
                        "tasks_per_call",
                    }
                )
            )
        )
        suite["learners"][0][key] = 1
    elif kind == "too_many_ways":
        suite["tasks"]["ways"] = draw(st.integers(min_value=1693, max_value=10**18))
    elif kind == "too_many_shots":
        suite["tasks"]["shots"] = draw(st.integers(min_value=20, max_value=10**18))
    elif kind == "bad_name":
        suite["name"] = draw(
            st.one_of(st.integers(), st.just(""), st.just("a/b"), st.lists(st.text(), max_size=2))
        )
    elif kind == "not_mapping":
        return yaml.safe_dump(
            draw(
                st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=20), st.integers())
            ),
            allow_unicode=True,
        )
    text = yaml.safe_dump(suite, allow_unicode=True, sort_keys=False)
    if kind == "broken_yaml":
        text += draw(
            st.sampled_from(
                [
                    "extra: [1, 2\n",
                    "  bad indent: {\n",
                    "eval: {episodes: 3\n",
                    "- item\n",
                    "\tname: tab\n",
                ]
            )
        )
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=malformed())
def test_malformed_suite_gives_one_line_and_exit_2(text, data_root):
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp) / "suite.yaml"
        suite.write_text(text, encoding="utf-8")
        out = Path(tmp) / "run"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(
                [
                    "run",
                    str(suite),
                    "--out",
                    str(out),
                    "--data-root",
                    str(data_root),
                    "--no-progress",
                ]
            )
        message = stderr.getvalue()
        assert code == 2, message
        assert len(message.strip().splitlines()) == 1, message
        assert message.startswith("fewbench: error: ") and "Traceback" not in message
        assert not out.exists()
