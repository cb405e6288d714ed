"""Subcommands of `sid-fast` (see `sid_fast/cli.py`), and the checks they share on what the user gave:
errors here are `sid_fast.errors.UserError`s that name the file, option or override (one line on the CLI)."""

from __future__ import annotations

from pathlib import Path

from sid_fast.errors import ConfigError, InputError


def _yaml_problem(error) -> str:
    """`line L, column C: <problem>` of a yaml.YAMLError (one line)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or str(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{' '.join(str(problem).split())}"


def check_overrides(overrides: list[str]) -> None:
    """Each `section.field=value` override must parse (its value is YAML); the error names the override."""
    import yaml

    for item in overrides:
        raw = item.split("=", 1)[1] if "=" in item else ""
        try:
            yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(error)})") from None


def load_user_config(path: str | None, overrides: list[str]):
    """`sid_fast.config.load_config(path, overrides)` with every failure a ConfigError naming the file (YAML syntax,
    not a mapping, unknown or bad field) or the override."""
    import yaml

    from sid_fast.config import load_config

    if path is not None:
        file = Path(path)
        if file.is_dir():
            raise ConfigError(f"{file}: is a directory, not a YAML config file")
        if not file.is_file():
            raise ConfigError(f"{file}: config file does not exist")
        try:
            loaded = yaml.safe_load(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"{file}: not a YAML config file (not UTF-8 text: byte {error.object[error.start]:#04x} "
                              f"at offset {error.start})") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{file}: invalid YAML at {_yaml_problem(error)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: a config file holds a mapping of sections (teacher:, train:, ...), "
                              f"found a {type(loaded).__name__}")
    check_overrides(overrides)
    try:
        return load_config(path, overrides)
    except ValueError as error:  # config.py's ConfigErrors name the field; say which file or override holds it
        if path is not None and overrides:
            try:  # the file alone: is the fault in the file or in an override?
                load_config(path, [])
            except ValueError:
                raise ConfigError(f"{path}: {error}") from None
            raise ConfigError(f"{error} (from the command-line overrides)") from None
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None


def output_dir(path: str | Path, option: str) -> Path:
    """An output directory the command may create: refuse an existing file, naming the option."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path}: exists and is not a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{option} {path}: {parent} is a file, not a directory")
            break
    return path


def input_path(path: str | Path, option: str, kind: str = "any") -> Path:
    """An input the user named: it must exist (kind: file, dir or any); the error names the option and the path."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{option} {path}: does not exist")
    if kind == "file" and not path.is_file():
        raise InputError(f"{option} {path}: is a directory, expected a file")
    if kind == "dir" and not path.is_dir():
        raise InputError(f"{option} {path}: is a file, expected a directory")
    return path
