"""`python -m streamem ...` runs the command line."""

import sys

from streamem.cli import main

if __name__ == "__main__":  # not when a child process imports the main module
    sys.exit(main())
