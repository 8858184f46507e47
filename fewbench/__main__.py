"""``python -m fewbench`` is the ``fewbench`` command."""

import sys

from fewbench.cli.parser import main

sys.exit(main())
