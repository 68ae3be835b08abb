"""``python -m mlatlas`` is the ``mlatlas`` command (what ``torchrun -m mlatlas`` starts)."""

import sys

from mlatlas.cli import main

sys.exit(main())
