"""`python -m streamem ...` runs the command line."""

import sys

from streamem.cli import main

sys.exit(main())
