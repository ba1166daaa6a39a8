"""``python -m bcd_engine``: see :mod:`bcd_engine.cli`."""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bcd_engine.cli import main

sys.exit(main())
