import sys

from netfence_operator.cli import main

sys.exit(main(sys.argv[1:]))
