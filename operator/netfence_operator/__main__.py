import sys

from netfence_cli.main import main

sys.exit(main(sys.argv[1:]))
