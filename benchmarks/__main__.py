"""Entry point: `python -m benchmarks --help`.

Rule: nothing here but handing over to `benchmarks.cli.main` and exiting with its status.
"""

import sys

from .cli import main

sys.exit(main())
