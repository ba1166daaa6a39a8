"""``python -m bcd_engine``: see :mod:`bcd_engine.cli`."""

import sys

from bcd_engine.cli import main

sys.exit(main())
