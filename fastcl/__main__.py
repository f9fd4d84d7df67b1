"""``python -m fastcl ...``: the command line (see fastcl.cli)."""
import sys

from fastcl.cli import main

sys.exit(main())
