"""The `phi3v` command line: one module per command group (see main.py for the command table)."""
