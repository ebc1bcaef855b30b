"""`python -m openldm.cli` (what torchrun runs) is the `openldm` command."""

import sys

from openldm.cli import main

sys.exit(main())
