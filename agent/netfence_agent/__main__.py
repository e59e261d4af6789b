"""`python -m netfence_agent agent|cleanup ...` (the same as `netfence agent|cleanup`)."""

import sys

from netfence_agent.cli import main

sys.exit(main())
