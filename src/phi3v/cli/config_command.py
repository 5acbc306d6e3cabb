"""`phi3v config [COMMAND]`: each configurable option's value and where it came from.

The values are those a command would start with when no flag is given: from the environment
(PHI3V_<NAME>), the config file (a [COMMAND] table, then the top level) or the built-in default
(cli/configuration.py holds the rules). Without COMMAND every configurable option of any command
is listed with the top-level file values (the [COMMAND] tables apply to their command only).
No model is loaded.
"""

from __future__ import annotations

from .arguments import HelpFormatter
from .configuration import (CONFIG_ENV, SECRET_DESTS, ConfigError, check_file_keys, config_path, configurable_actions,
                            env_name, read_config_file, resolve)
from .output import print_json

EXAMPLES = """examples:
  phi3v config                      every option: value, source, environment variable
  phi3v config serve                what `phi3v serve` would start with
  PHI3V_NUM_CROPS=4 phi3v config ask
  phi3v config --json

precedence: command-line flag > environment variable > config file ([COMMAND] table, then top
level) > built-in default. The file: $PHI3V_CONFIG, else $XDG_CONFIG_HOME/phi3v/config.toml,
else ~/.config/phi3v/config.toml."""


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="show the configured defaults and where each comes from",
                       description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("for_command", nargs="?", metavar="COMMAND", help="only the options of this command")
    p.add_argument("--json", action="store_true", help="one JSON object: file, options [{key, value, source, env}]")
    # the other commands' parsers, read when this one runs (all are registered by then)
    p.set_defaults(func=run, command_parsers=sub.choices, parser=p)


def collect(parsers: dict, command: str | None) -> list[dict]:
    """[{key, flag, value, source, env, commands}] in the order the commands declare them."""
    path = config_path()
    data = read_config_file(path)
    check_file_keys(data, path, parsers)
    rows: dict[str, dict] = {}
    names = [command] if command else [n for n in parsers if n != "config"]
    for name in names:
        actions = {a.dest: a for a in configurable_actions(parsers[name])}
        # without a command: the top level only (the [COMMAND] tables are per command)
        for dest, (value, source) in resolve(parsers[name], name if command else "", data, path).items():
            if dest in rows:
                rows[dest]["commands"].append(name)
                continue
            if dest in SECRET_DESTS and value:
                value = "(set)"
            rows[dest] = {"key": dest, "flag": max(actions[dest].option_strings, key=len), "value": value,
                          "source": source, "env": env_name(dest), "commands": [name]}
    return list(rows.values())


def run(args) -> int:
    parsers = args.command_parsers
    if args.for_command is not None and args.for_command not in parsers:
        from .suggest import unknown_command_message

        args.parser.error(unknown_command_message(args.for_command, parsers))
    path = config_path()
    try:
        rows = collect(parsers, args.for_command)
    except ConfigError as err:
        args.parser.error(str(err))
    if args.json:
        print_json({"file": str(path), "file_exists": path.is_file(), "options": rows})
        return 0
    print(f"config file: {path} ({'found' if path.is_file() else 'none'}; set {CONFIG_ENV} to use another)")
    width = max(len(r["key"]) for r in rows)
    shown = [(r["key"], "none" if r["value"] is None else str(r["value"]), r["source"], r["env"]) for r in rows]
    value_width = min(max(len(s[1]) for s in shown), 40)
    source_width = max(len(s[2]) for s in shown)
    for key, value, source, env in shown:
        print(f"{key:<{width}}  {value:<{value_width}}  {source:<{source_width}}  {env}")
    return 0
