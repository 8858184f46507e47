"""``python -m fewbench`` is the ``fewbench`` command."""

import sys

from fewbench.cli import main

sys.exit(main())
