"""Shareable test episodes (``fewbench episodes export`` and ``score``).

A manifest names a setting's fixed test episodes, example by example, so that a method
outside fewbench can run on exactly the episodes fewbench's own cells are tested on; its
predictions are scored back into a run directory that reports pair with those cells,
episode by episode. Modules, one job each:

- :mod:`~fewbench.episodes.draw`: the episodes drawn again from the data, as evaluation
  draws them, with their examples' names and the hashes of their decoded images;
- :mod:`~fewbench.episodes.manifest`: the manifest's format, its hash, reading one;
- :mod:`~fewbench.episodes.export`: which cells' episodes, and writing the manifest;
- :mod:`~fewbench.episodes.predictions`: reading an outside method's predictions;
- :mod:`~fewbench.episodes.score`: checking a manifest against the local data, scoring,
  writing the run directory.
"""
