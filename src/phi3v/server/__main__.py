"""`python -m phi3v.server --model M [...]`: the same as `phi3v serve`."""

import sys

from ..cli.main import main

sys.exit(main(["serve", *sys.argv[1:]]))
