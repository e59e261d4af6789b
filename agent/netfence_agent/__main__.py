"""`python -m netfence_agent agent|cleanup ...` (the same as `netfence agent|cleanup`)."""

import sys

from netfence_cli.main import main

sys.exit(main(sys.argv[1:]))
