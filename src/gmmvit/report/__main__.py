"""`python -m gmmvit.report RUN... --out-dir DIR`: the same command as `gmmvit report`, for a
checkout without the `gmmvit` entry point installed."""

import sys

from .command import main

sys.exit(main())
