"""`python -m torch_agd train ...` is `agd train ...`."""

import sys

from torch_agd.cli import main

sys.exit(main())
