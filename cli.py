"""`python cli.py …` runs the same command line as the `landscape` console script."""

import sys

from landscape.cli import main

if __name__ == "__main__":
    sys.exit(main())
