"""``python -m kvtier.bench.peers [install] [NAME ...]``."""

import sys

from kvtier.bench.peers import main

raise SystemExit(main(sys.argv[1:]))
