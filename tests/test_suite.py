"""Suite loading, --set, validation errors and grid expansion."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from fewbench.data.check import expand_and_check as expand
from fewbench.errors import DataError, SuiteError
from fewbench.suite.grid import cell_id
from fewbench.suite.loading import apply_set, load_suite_file, parse_yaml

REPO = Path(__file__).resolve().parent.parent

BASE = """\
name: demo
seeds: [0]
datasets:
  - {name: omniglot, split: vinyals, image_size: 28}
tasks: {ways: [5, 20], shots: [1, 5], query: 1}
backbones:
  - {name: conv4, hidden: 64, pool: stride}
learners:
  - {name: maml, inner_lr: 0.4, meta_batch_size: 32}
  - {name: fomaml}
  - {name: finetune, head: linear}
train: {iterations: 100, validate_every: 50, val_episodes: 10}
eval: {episodes: 20, query: 15, seed: 0}
"""


def grid(text: str, registry, data_root, sets=(), require_data=True):
    source = parse_yaml(textwrap.dedent(text), "demo.yaml")
    for assignment in sets:
        apply_set(source, assignment)
    return expand(source, registry, data_root, require_data=require_data)


def error_of(text: str, registry, data_root, sets=()) -> SuiteError:
    with pytest.raises(SuiteError) as info:
        grid(text, registry, data_root, sets)
    return info.value


def test_grid_is_the_product_of_its_axes(registry, data_root):
    suite = grid(BASE, registry, data_root)
    assert len(suite.cells) == 2 * 2 * 3
    assert suite.cells[0].label == "omniglot/5w1s/conv4/maml/seed0"
    assert len({c.id for c in suite.cells}) == 12
    # Every plugin parameter is filled with its default.
    maml = suite.cells[0].config["learner"]
    assert maml["inner_steps"] == 1 and maml["first_order"] is False


def test_list_parameters_expand_and_get_readable_labels(registry, data_root):
    text = BASE.replace(
        "{name: maml, inner_lr: 0.4, meta_batch_size: 32}", "{name: maml, inner_lr: [0.1, 0.4]}"
    )
    suite = grid(text, registry, data_root, sets=["tasks.ways=5", "tasks.shots=1", "seeds=[0, 1]"])
    labels = [c.label for c in suite.cells]
    assert len(labels) == 4 * 2
    assert "omniglot/5w1s/conv4/maml[inner_lr=0.1]/seed1" in labels
    assert "omniglot/5w1s/conv4/maml[inner_lr=0.4]/seed0" in labels


def test_list_valued_parameter_expands_only_from_a_list_of_lists(registry, data_root):
    text = BASE.replace(
        "{name: conv4, hidden: 64, pool: stride}", "{name: mlp, hidden: [[8], [16, 16]]}"
    )
    suite = grid(
        text, registry, data_root, sets=["tasks.ways=5", "tasks.shots=1", "learners=[maml]"]
    )
    assert [c.config["backbone"]["hidden"] for c in suite.cells] == [[8], [16, 16]]
    single = grid(
        BASE.replace("{name: conv4, hidden: 64, pool: stride}", "{name: mlp, hidden: [8, 8]}"),
        registry,
        data_root,
        sets=["tasks.ways=5", "tasks.shots=1", "learners=[maml]"],
    )
    assert [c.config["backbone"]["hidden"] for c in single.cells] == [[8, 8]]


def test_overrides_apply_to_matching_cells_only(registry, data_root):
    text = BASE + textwrap.dedent("""\
        overrides:
          - when: {shots: 5}
            set: {tasks.query: 5}
          - when: {ways: 20, learner: [maml, fomaml]}
            set: {learner.inner_lr: 0.1, learner.inner_steps: 5, learner.meta_batch_size: 16}
          - when: {learner: finetune}
            set: {train.iterations: 7}
    """)
    cells = {c.label: c.config for c in grid(text, registry, data_root).cells}
    assert cells["omniglot/20w1s/conv4/maml/seed0"]["learner"]["inner_lr"] == 0.1
    assert cells["omniglot/20w5s/conv4/fomaml/seed0"]["learner"]["meta_batch_size"] == 16
    assert cells["omniglot/5w1s/conv4/maml/seed0"]["learner"]["inner_lr"] == 0.4
    assert cells["omniglot/20w1s/conv4/finetune/seed0"]["learner"]["head"] == "linear"
    assert cells["omniglot/5w5s/conv4/maml/seed0"]["tasks"]["query"] == 5
    assert cells["omniglot/5w1s/conv4/maml/seed0"]["tasks"]["query"] == 1
    assert cells["omniglot/5w1s/conv4/finetune/seed0"]["train"]["iterations"] == 7
    assert cells["omniglot/5w1s/conv4/maml/seed0"]["train"]["iterations"] == 100


def test_override_of_a_parameter_some_matched_learner_lacks_is_an_error(registry, data_root):
    text = BASE + "overrides:\n  - when: {ways: 20}\n    set: {learner.meta_batch_size: 16}\n"
    error = error_of(text, registry, data_root)
    assert "finetune" in str(error) and "meta_batch_size" in str(error)
    assert error.path == "overrides[0].set.learner.meta_batch_size"
    assert error.line == 16


def test_cell_ids_are_stable_and_follow_the_configuration(registry, data_root):
    first = grid(BASE, registry, data_root).cells
    again = grid(BASE, registry, data_root).cells
    assert [c.id for c in first] == [c.id for c in again]
    changed = grid(BASE, registry, data_root, sets=["learners.maml.inner_lr=0.3"]).cells
    assert first[0].id != changed[0].id  # maml 5w1s changed
    assert first[1].id == changed[1].id  # fomaml 5w1s did not
    assert cell_id({"a": 1, "b": 2}) == cell_id({"b": 2, "a": 1})


def test_set_accepts_dotted_paths_yaml_values_and_plugin_names(registry, data_root):
    suite = grid(
        BASE,
        registry,
        data_root,
        sets=[
            "train.iterations=200",
            "seeds=[0,1]",
            "learners.maml.meta_batch_size=4",
            "learners[2].head=cosine",
        ],
    )
    config = suite.cells[0].config
    assert config["train"]["iterations"] == 200
    assert config["learner"]["meta_batch_size"] == 4
    assert {c.config["seed"] for c in suite.cells} == {0, 1}
    assert {c.config["learner"].get("head") for c in suite.cells} >= {"cosine"}


@pytest.mark.parametrize(
    ("text_change", "sets", "path", "line", "fragment"),
    [
        (("train: {", "trian: {"), [], "trian", 12, "did you mean 'train'"),
        (
            ("iterations: 100", "iterations: lots"),
            [],
            "train.iterations",
            12,
            "expected an integer",
        ),
        (("iterations: 100", "iterations: -3"), [], "train.iterations", 12, "at least 1"),
        (("{name: fomaml}", "{name: fomal}"), [], "learners[1].name", 10, "did you mean 'fomaml'"),
        (
            ("inner_lr: 0.4", "inner_rl: 0.4"),
            [],
            "learners[0].inner_rl",
            9,
            "did you mean 'inner_lr'",
        ),
        (("inner_lr: 0.4", "inner_lr: fast"), [], "learners[0].inner_lr", 9, "expected a number"),
        (
            ("pool: stride", "pool: avg"),
            [],
            "backbones[0].pool",
            7,
            "must be one of 'stride', 'max'",
        ),
        (("ways: [5, 20]", "ways: [5, 2000]"), [], "tasks.ways", 5, "split of omniglot has 688"),
        (("query: 15", "query: 19"), [], "eval.query", 13, "= 24 examples per class"),
        (("", ""), ["tasks.query=30"], "tasks.query", 5, "examples per class"),
        (("seeds: [0]", "seeds: [0, zero]"), [], "seeds[1]", 2, "expected an integer"),
    ],
)
def test_validation_errors_name_file_key_path_and_line(
    registry, data_root, text_change, sets, path, line, fragment
):
    error = error_of(BASE.replace(*text_change), registry, data_root, sets)
    assert error.path == path
    assert error.line == line
    assert fragment in str(error)
    assert str(error).startswith(f"demo.yaml:{line}: {path}: ")


def test_missing_sections_and_bad_yaml(registry, data_root):
    assert "missing required section 'learners'" in str(
        error_of(BASE.split("learners:")[0], registry, data_root)
    )
    broken = error_of(BASE.replace("tasks: {ways", "tasks: {ways: [5,"), registry, data_root)
    assert "invalid YAML" in str(broken) and broken.line is not None
    assert "mapping of sections" in str(error_of("- just\n- a list\n", registry, data_root))


def test_set_reaches_entries_written_as_bare_names(registry, data_root):
    text = BASE.replace("  - {name: fomaml}\n", "  - fomaml\n")
    suite = grid(text, registry, data_root, sets=["learners.fomaml.inner_lr=0.2"])
    assert {
        c.config["learner"]["inner_lr"] for c in suite.cells if c.labels["learner"] == "fomaml"
    } == {0.2}


def test_set_errors_are_clear(registry, data_root):
    with pytest.raises(SuiteError, match="KEY=VALUE"):
        grid(BASE, registry, data_root, sets=["train.iterations"])
    with pytest.raises(SuiteError, match="did you mean 'maml'"):
        grid(BASE, registry, data_root, sets=["learners.mamll.inner_lr=0.1"])


def test_missing_data_is_an_error_that_says_where_and_how(registry, tmp_path):
    with pytest.raises(DataError) as info:
        grid(BASE, registry, tmp_path)
    message = str(info.value)
    assert str(tmp_path / "omniglot") in message and "images_background" in message
    # A dry run still expands, with a warning.
    suite = grid(BASE, registry, tmp_path, require_data=False)
    assert len(suite.cells) == 12 and suite.warnings


@pytest.mark.parametrize(
    "name",
    [
        "omniglot.yaml",
        "omniglot-cpu.yaml",
        "omniglot-metric.yaml",
        "omniglot-metric-cpu.yaml",
        "omniglot-gradient.yaml",
        "omniglot-gradient-cpu.yaml",
    ],
)
def test_shipped_suites_validate(registry, data_root, name):
    suite = expand(load_suite_file(REPO / "suites" / name), registry, data_root)
    assert suite.cells


@pytest.mark.parametrize("name", ["miniimagenet-metric.yaml", "miniimagenet-gradient.yaml"])
def test_shipped_miniimagenet_suites_validate_without_the_images(registry, data_root, name):
    suite = expand(load_suite_file(REPO / "suites" / name), registry, data_root, require_data=False)
    assert suite.cells


def test_gradient_suite_follows_each_papers_protocol(registry, data_root):
    cells = {
        c.label: c.config
        for c in expand(
            load_suite_file(REPO / "suites/omniglot-gradient.yaml"), registry, data_root
        ).cells
    }
    assert len(cells) == 32
    reptile = cells["omniglot/20w1s/conv4/reptile[transductive=False]/seed0"]
    assert reptile["train"]["iterations"] == 200000
    assert (reptile["learner"]["inner_batch"], reptile["learner"]["inner_lr"]) == (20, 0.0005)
    assert reptile["tasks"]["train_shots"] + reptile["tasks"]["query"] == 10
    anil = cells["omniglot/20w5s/conv4/anil/seed0"]["learner"]
    assert (anil["inner_lr"], anil["inner_steps"], anil["meta_batch_size"]) == (0.1, 5, 16)
    assert cells["omniglot/5w1s/conv4/mamlpp/seed0"]["train"]["iterations"] == 125000


def test_finn_protocol_in_the_gpu_suite(registry, data_root):
    cells = {
        c.label: c.config
        for c in expand(load_suite_file(REPO / "suites/omniglot.yaml"), registry, data_root).cells
    }
    assert len(cells) == 12
    twenty = cells["omniglot/20w1s/conv4/maml/seed0"]["learner"]
    assert (twenty["inner_lr"], twenty["inner_steps"], twenty["meta_batch_size"]) == (0.1, 5, 16)
    five = cells["omniglot/5w1s/conv4/maml/seed0"]
    assert (five["learner"]["inner_lr"], five["learner"]["meta_batch_size"]) == (0.4, 32)
    assert five["train"]["iterations"] == 60000 and five["eval"]["episodes"] == 600
    for label, config in cells.items():
        assert config["tasks"]["query"] == config["tasks"]["shots"], (
            label
        )  # query = shots in training


@pytest.mark.parametrize(
    ("hidden", "fragment"),
    [("[8, -1]", "items must be at least 1"), ("[8, x]", "every item must be an integer")],
)
def test_list_parameter_items_are_checked(registry, data_root, hidden, fragment):
    text = BASE.replace(
        "{name: conv4, hidden: 64, pool: stride}", f"{{name: mlp, hidden: {hidden}}}"
    )
    error = error_of(text, registry, data_root)
    assert error.path == "backbones[0].hidden" and fragment in str(error)


@pytest.mark.parametrize(
    ("section", "path", "fragment"),
    [
        ("execution: {executor: slrum}", "execution.executor", "did you mean 'slurm'"),
        ("execution: {executor: slurm, partiton: gpu}", "execution.partiton", "'partition'"),
        ("execution: {executor: ray, gpus_per_cell: half}", "execution.gpus_per_cell", "a number"),
        ("execution: [slurm]", "execution", "expected a mapping"),
    ],
)
def test_execution_section_errors_say_where(registry, data_root, section, path, fragment):
    error = error_of(BASE + section + "\n", registry, data_root)
    assert (error.path, error.line) == (path, 14) and fragment in str(error)


def test_execution_section_does_not_change_cells(registry, data_root):
    plain = grid(BASE, registry, data_root)
    slurm = grid(BASE + "execution: {executor: slurm, partition: gpu}\n", registry, data_root)
    assert [c.id for c in slurm.cells] == [c.id for c in plain.cells]
    assert slurm.execution == {"executor": "slurm", "partition": "gpu"}
    assert plain.execution == {}


def test_a_grid_beyond_the_bound_is_refused_before_it_is_built(registry, tmp_path):
    """A ten-line suite of 300 seeds x 300 ways x 299 shots (26.9 million cells) grew memory
    without end: the product is counted before anything is expanded, and refused in one line
    naming the axes; so is one entry whose list-valued parameters multiply past the bound."""
    import time
    import tracemalloc

    numbers = ", ".join(str(i) for i in range(1, 301))
    text = f"""\
        name: huge
        seeds: [{", ".join(str(i) for i in range(300))}]
        datasets: [{{name: sinusoid}}]
        tasks: {{ways: [{numbers}], shots: [{numbers[3:]}], query: 1}}
        backbones: [{{name: mlp}}]
        learners: [{{name: maml}}]
        """
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(SuiteError) as info:
        grid(text, registry, tmp_path, require_data=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "the grid has 26,910,000 cells (300 seeds x 300 ways x 299 shots x 1 datasets)" in str(
        info.value
    )
    assert "100,000" in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - started < 60 and peak < 200 * 2**20
    values = ", ".join(f"0.{i:03d}" for i in range(1, 60))
    entry = f"learners: [{{name: maml, inner_lr: [{values}], meta_lr: [{values}], inner_steps: [{', '.join(str(i) for i in range(1, 31))}]}}]"
    text = (
        text.replace("learners: [{name: maml}]", entry)
        .replace(numbers, "1")
        .replace(numbers[3:], "1")
    )
    with pytest.raises(
        SuiteError,
        match=re.escape(
            "104,430 cells (59 inner_lr values x 59 meta_lr values x 30 inner_steps values)"
        ),
    ):
        grid(text, registry, tmp_path, require_data=False)


def test_names_that_look_right_get_honest_hints(registry, tmp_path):
    """MAML finds maml (case ignored); a Cyrillic 'а' in 'mаml' is named, not answered with
    a suggestion that looks identical."""
    upper = error_of(BASE.replace("{name: maml", "{name: MAML"), registry, tmp_path)
    assert "unknown learner 'MAML' (did you mean 'maml'?)" in str(upper)
    cyrillic = error_of(BASE.replace("{name: maml", "{name: m\u0430ml"), registry, tmp_path)
    assert "contains non-ASCII letters: '\u0430' (U+0430)" in str(cyrillic)
    assert "did you mean" not in str(cyrillic)


def test_a_huge_value_is_not_echoed_whole_in_the_error_line(tmp_path):
    from helpers import run_cli

    suite = tmp_path / "suite.yaml"
    suite.write_text(textwrap.dedent(BASE).replace("{name: maml", "{name: " + "x" * 1_000_000))
    result = run_cli("run", str(suite), "--dry-run")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert len(line) < 1200 and "characters cut" in line


def test_many_overrides_matching_nothing_are_summarised(registry, tmp_path):
    overrides = "".join(
        f"  - when: {{learner: maml, ways: {100 + i}}}\n    set: {{tasks.query: 2}}\n"
        for i in range(1000)
    )
    suite = grid(BASE + "overrides:\n" + overrides, registry, tmp_path, require_data=False)
    unused = [w for w in suite.warnings if "matches no cell" in w]
    assert len(unused) == 6 and "and 995 more overrides" in unused[-1]


def test_a_test_dataset_of_another_task_type_is_one_line(registry, tmp_path):
    """eval.dataset: navigation2d under a sinusoid suite was a KeyError traceback."""
    text = """\
        name: cross
        datasets: [{name: sinusoid}]
        tasks: {ways: 1, shots: 5, query: 5}
        backbones: [{name: mlp}]
        learners: [{name: maml}]
        eval: {dataset: navigation2d}
        """
    error = error_of(text, registry, tmp_path)
    assert "eval.dataset navigation2d poses reinforcement tasks" in str(error)
    assert "\n" not in str(error)
