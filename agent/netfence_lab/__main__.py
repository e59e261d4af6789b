"""`python -m netfence_lab lab up ...` (the same commands as `netfence lab ...`)."""

import sys

from netfence_lab.cli import main

sys.exit(main())
