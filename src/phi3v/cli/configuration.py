"""Defaults from the environment and a config file: flag > environment > file > built-in default.

A flag is configurable when its declaration marks it (`configurable(parser.add_argument(...))`:
the model options and generation options in arguments.py, every `phi3v serve` setting in
serve.py). Its environment variable and file key come from its argparse dest, so nothing is
listed twice:

    --num-crops       PHI3V_NUM_CROPS         num_crops = 4
    --image-cache-mb  PHI3V_IMAGE_CACHE_MB    image_cache_mb = 256

The config file is TOML, at $PHI3V_CONFIG, else $XDG_CONFIG_HOME/phi3v/config.toml, else
~/.config/phi3v/config.toml (a missing file is no error). Top-level keys apply to every command
that has the flag; a table named after a command ([serve], [ask]) applies to that command and
wins over the top level:

    device = "cpu"
    num_crops = 4
    [serve]
    port = 8080

Before argparse reads the command line, the chosen command's configurable flags get their
environment or file value as their default (converted and checked by the flag's own type and
choices), so a flag on the command line still wins. A bad value is a usage error naming the
variable, or the file and key; an unknown key in the file too. Light: no torch, no TOML parse
unless a file exists.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CONFIG_ENV = "PHI3V_CONFIG"
ENV_PREFIX = "PHI3V_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
SECRET_DESTS = frozenset({"api_key"})  # shown masked by `phi3v config`


class ConfigError(Exception):
    """A value of the environment or of the config file that a flag would refuse (a usage error)."""


def configurable(action: argparse.Action) -> argparse.Action:
    """Mark a flag (the Action add_argument returned) as settable from the environment and the file."""
    action.phi3v_configurable = True
    return action


def env_name(dest: str) -> str:
    """The environment variable of a flag's dest: num_crops -> PHI3V_NUM_CROPS."""
    return ENV_PREFIX + dest.upper()


def config_path(environ=None) -> Path:
    """Where the config file is read from ($PHI3V_CONFIG, XDG config home, ~/.config)."""
    environ = os.environ if environ is None else environ
    if environ.get(CONFIG_ENV):
        return Path(os.path.expanduser(environ[CONFIG_ENV]))
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "phi3v" / "config.toml"


def read_config_file(path: Path) -> dict:
    """The file's TOML as a dict ({} when there is no file); unreadable or invalid TOML: ConfigError."""
    if not path.is_file():
        if os.environ.get(CONFIG_ENV) and Path(os.path.expanduser(os.environ[CONFIG_ENV])) == path:
            raise ConfigError(f"{CONFIG_ENV}={path}: no such file")
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError(f"{path}: reading a config file needs Python 3.11+ or `pip install tomli`") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None


def configurable_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if getattr(a, "phi3v_configurable", False)]


def command_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{command name: its sub-parser} of the top-level parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _file_key(key: str) -> str:
    return key.replace("-", "_")


def check_file_keys(data: dict, path: Path, parsers: dict[str, argparse.ArgumentParser]) -> None:
    """Every key of the file is some command's configurable flag; every table a command."""
    known = {a.dest for p in parsers.values() for a in configurable_actions(p)}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in parsers:
                raise ConfigError(f"{path}: [{key}] is not a phi3v command (tables are named after commands)")
            own = {a.dest for a in configurable_actions(parsers[key])}
            for sub_key in value:
                if _file_key(sub_key) not in own:
                    raise ConfigError(f"{path}: key {sub_key!r} in [{key}] is not a configurable option of "
                                      f"phi3v {key} (see `phi3v config {key}`)")
        elif _file_key(key) not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (`phi3v config` lists the keys)")


def convert(action: argparse.Action, raw, where: str):
    """`raw` (environment text or a TOML value) as the flag would parse it; ConfigError naming `where`."""
    if action.nargs == 0:  # an on/off flag (store_true, --x/--no-x)
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if isinstance(raw, (dict, list, bool)):
        raise ConfigError(f"{where}: expected {'a number' if action.type else 'text'}, got {raw!r}")
    text = str(raw)
    try:
        value = action.type(text) if action.type else text
    except argparse.ArgumentTypeError as err:
        raise ConfigError(f"{where}: {err}") from None
    except ValueError:  # a plain int / float type (--port)
        kind = "a whole number" if action.type is int else "a number"
        raise ConfigError(f"{where}: expected {kind}, got {raw!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {raw!r}")
    return value


def resolve(parser: argparse.ArgumentParser, command: str, data: dict, path: Path,
            environ=None) -> dict[str, tuple[object, str]]:
    """{dest: (value, source)} for the configurable flags of `parser` (the command's sub-parser).

    source: "environment PHI3V_X", "PATH [command]", "PATH" or "default".
    """
    environ = os.environ if environ is None else environ
    section = {_file_key(k): v for k, v in data.get(command, {}).items()} if isinstance(data.get(command), dict) else {}
    top = {_file_key(k): v for k, v in data.items() if not isinstance(v, dict)}
    out = {}
    for action in configurable_actions(parser):
        name = env_name(action.dest)
        if environ.get(name, "") != "":
            out[action.dest] = (convert(action, environ[name], f"environment variable {name}"), f"environment {name}")
        elif action.dest in section:
            where = f"{path} [{command}] {action.dest}"
            out[action.dest] = (convert(action, section[action.dest], f"{path}: key {action.dest!r} in [{command}]"),
                                where)
        elif action.dest in top:
            out[action.dest] = (convert(action, top[action.dest], f"{path}: key {action.dest!r}"),
                                f"{path} {action.dest}")
        else:
            out[action.dest] = (action.default, "default")
    return out


def given_on_command_line(action: argparse.Action, argv: list[str]) -> bool:
    """Whether one of the flag's spellings is in argv (--flag, --flag=V, -mV)."""
    for token in argv:
        if token == "--":
            break
        for opt in action.option_strings:
            if token == opt or token.startswith(opt + "=") or (len(opt) == 2 and token.startswith(opt)
                                                                and not token.startswith("--")):
                return True
    return False


def apply_configuration(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """Set the chosen command's configurable defaults from the environment and the file.

    Returns {dest: source} ("command line" for flags given in argv), or {} when argv names no
    command. Bad values exit 2 through parser.error.
    """
    parsers = command_parsers(parser)
    command = next((t for t in argv if not t.startswith("-")), None)
    if command not in parsers:
        return {}
    sub = parsers[command]
    path = config_path()
    try:
        data = read_config_file(path)
        check_file_keys(data, path, parsers)
        values = resolve(sub, command, data, path)
    except ConfigError as err:
        sub.error(str(err))
    by_dest = {a.dest: a for a in configurable_actions(sub)}
    sources = {}
    for dest, (value, source) in values.items():
        by_dest[dest].default = value
        sources[dest] = "command line" if given_on_command_line(by_dest[dest], argv) else source
    sub.set_defaults(config_sources=sources)
    return sources
