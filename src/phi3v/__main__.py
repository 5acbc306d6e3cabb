"""`python -m phi3v ...` is the same as the `phi3v` command."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
