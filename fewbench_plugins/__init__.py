"""fewbench's built-in plugins.

Installed as the package ``fewbench_plugins`` and registered through the
``fewbench`` entry-point group, exactly as a third-party plugin package is.
"""
