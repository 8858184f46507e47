"""Each test episode's classes, drawn again from the data exactly as evaluation drew them:
what ``fewbench report --interval population`` needs (the results store keeps each
episode's result, not its classes). Outside :mod:`fewbench.reports`, which does not import
the running code."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fewbench.errors import FewbenchError
from fewbench.plugin.task_types import by_metric

if TYPE_CHECKING:
    import numpy as np

    from fewbench.registry import Registry
    from fewbench.reports.results import Setting


def setting_words(s: Setting) -> str:
    """``omniglot 5-way 1-shot`` (the dataset alone for tasks without ways)."""
    if not by_metric(s.metric).has_ways:
        return str(s.keys["dataset"])
    return f"{s.keys['dataset']} {s.keys['ways']}-way {s.keys['shots']}-shot"


class DrawnTestClasses:
    """``--interval population``: each setting's test episodes' classes, drawn again from
    the data exactly as evaluation drew them. The results store keeps each episode's result,
    not its classes; evaluation draws episode ``i`` with ``spec.generator(i)``
    (fewbench.running.evaluation), and a :class:`~fewbench.plugin.dataset.ClassPool` draws
    the classes first, with nothing but that generator and its number of classes, so the
    same call gives them back. Loads the test dataset from the data root (default
    ``$FEWBENCH_DATA``), once per dataset; a pool that draws its episodes some other way is
    refused, since its classes cannot be known."""

    def __init__(
        self,
        data_root: Path | None = None,
        cache_dir: Path | None = None,
        registry: Registry | None = None,
    ):
        from fewbench.storage.paths import default_cache_dir, default_data_root

        self.data_root = Path(data_root) if data_root is not None else default_data_root()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._registry = registry
        self._sources: dict[str, tuple[Any, Any]] = {}

    def __call__(self, s: Setting) -> np.ndarray | None:
        import numpy as np

        from fewbench.episodes.draw import drawn_by_class_pool
        from fewbench.plugin.dataset import ClassPool
        from fewbench.running.evaluation import EpisodeSpec, dataset_identity
        from fewbench.suite.cell import Cell

        cell = Cell.from_config(s.config, "report")
        config = dict(cell.eval.dataset or cell.dataset.config())
        dataset, source = self._test_source(config, s)
        if not isinstance(source, ClassPool):
            if not dataset.needs_files:  # it generates its tasks: each episode's is new
                return None
            raise FewbenchError(
                f"--interval population: {setting_words(s)}: dataset {config['name']}'s test "
                "episodes come from no pool of classes fewbench can draw again; use --interval "
                "episodes"
            )
        if not drawn_by_class_pool(source, classes_first=True):
            raise FewbenchError(
                f"--interval population: {setting_words(s)}: dataset {config['name']} draws "
                "its episodes its own way, so their classes cannot be drawn again; use "
                "--interval episodes"
            )
        identity = dataset_identity(config, getattr(dataset, "episode_identity", None))
        spec = EpisodeSpec.of(cell, identity, "test")
        episodes = s.values.shape[1]
        return np.stack(
            [
                source.draw_classes(1, cell.ways, spec.generator(i))[0].cpu().numpy()
                for i in range(episodes)
            ]
        )

    def _test_source(self, config: dict[str, Any], s: Setting) -> tuple[Any, Any]:
        import json

        key = json.dumps(config, sort_keys=True)
        if key not in self._sources:
            if self._registry is None:
                from fewbench.registry import Registry

                self._registry = Registry()
            from fewbench.episodes.draw import build_dataset, load_split

            try:
                dataset = build_dataset(config, self._registry)
                source = load_split(dataset, self.data_root, self.cache_dir)
            except (FewbenchError, OSError, ValueError, KeyError) as exc:
                raise FewbenchError(
                    f"--interval population: {setting_words(s)}: the test episodes' classes "
                    f"are drawn again from the data, and dataset {config['name']} could not be "
                    f"loaded from {self.data_root} ({exc}); set FEWBENCH_DATA to the data root "
                    "the runs used, or use --interval episodes"
                ) from None
            self._sources[key] = (dataset, source)
        return self._sources[key]
