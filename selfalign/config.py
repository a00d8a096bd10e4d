"""Typed configs: a dataclass per recipe is the single source of truth for YAML files and CLI overrides.

`load_config(Cls, "configs/spa.yaml", ["train.beta=0.2", "rounds=3"])` reads the YAML, applies `key=value`
overrides (values parsed as YAML, dotted keys reach nested sections) and builds the dataclass. Unknown keys
and wrongly typed values are errors that name the file and the key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from selfalign.errors import ConfigError

T = TypeVar("T")


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected key=value (e.g. train.beta=0.1)")
    # a command-line value has no comments: YAML would cut "a #b" to "a" and read "#1" as null, so '#' is parsed
    # as a stand-in character and put back
    try:
        parsed = _restore_hash(yaml.safe_load(value.replace("#", _HASH))) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


_HASH = "\ue000"  # a private-use character: never in a real value


def _restore_hash(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace(_HASH, "#")
    if isinstance(value, list):
        return [_restore_hash(v) for v in value]
    if isinstance(value, dict):
        return {_restore_hash(k): _restore_hash(v) for k, v in value.items()}
    return value


def _set(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string; it is a number to anyone typing it
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    return value


def _overlay(base: dict, over: dict) -> dict:
    """`base` with `over`'s keys replacing its own, nested mappings merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]  # in the file's order: the error names the first one's line
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise _keyed(ConfigError(f"unknown key '{key}' (known keys here: {', '.join(fields)})"), key)
    kwargs = {}
    for name, value in data.items():
        factory = fields[name].default_factory
        if isinstance(value, dict) and factory is not dataclasses.MISSING:
            default = factory()
            if dataclasses.is_dataclass(default):
                # a section names only what it changes: the rest keeps the recipe's default for that section
                # (e.g. SPA's seed_train has epochs=3), not the section class's generic one
                value = _overlay(dataclasses.asdict(default), value)
        key = f"{where}.{name}" if where else name
        try:
            kwargs[name] = _check_type(value, hints[name], key)
        except ConfigError as e:
            raise _keyed(e, key) from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a __post_init__ check; its message starts with the field it is about
        if isinstance(e, ConfigError) and getattr(e, "key", None) is not None:  # or it named its key (config_error)
            if where:
                e.key = f"{where}.{e.key}"
            raise
        first = str(e).split(" ", 1)[0]
        key = (f"{where}.{first}" if where else first) if first in fields else where
        raise _keyed(ConfigError(f"{where + ': ' if where else ''}{e}"), key) from None


def _keyed(error: ConfigError, key: str) -> ConfigError:
    """`error` tagged with the dotted key it is about (the innermost one wins), for load_config to place it."""
    if getattr(error, "key", None) is None:
        error.key = key
    return error


def at_least(section: Any, minimum: int, *names: str) -> None:
    """For a config dataclass's __post_init__: each named field is >= minimum, or None (its "use the default")."""
    for name in names:
        value = getattr(section, name)
        if value is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, not {value}")


def config_error(key: str, problem: str | Exception, also: tuple[str, ...] = ()) -> ConfigError:
    """An error about the value of config key `key` (dotted), found after loading (e.g. a model that is not on this
    machine): `locate_error` points it at the file line or --set override that gave the value. `also`: other keys
    whose values share the blame (a data size too large for a filtered pool): an --set of one of them is named
    when `key` itself was not overridden."""
    error = _keyed(ConfigError(f"{key}: {problem}"), key)
    error.also = tuple(also)
    return error


def _key_lines(text: str, name: str = "config") -> dict[str, int]:
    """Dotted key -> 1-based line of that key in a YAML mapping document (nested sections included). A key given
    twice in one mapping is an error: YAML loaders keep the last one silently, so a second `sampling:` section
    would quietly replace the first."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigError(f"{name}:{line}: key '{key}' given twice (first on line {lines[key]})")
                lines[key] = line
                walk(value_node, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """A recipe config: dataclass `cls` built from YAML file `path` (default: cls's defaults) with each override
    ("dotted.key=value", as `--set` takes) applied on top, every value checked against the field's type. Errors are
    one-line ConfigErrors naming the --set, else the file's line, that gave the bad value."""
    data: dict = {}
    name = str(path) if path else cls.__name__
    lines: dict[str, int] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found" if not p.exists() else f"{p}: not a file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the config ({e})") from None
        try:
            data = yaml.safe_load(text) or {}
            lines = _key_lines(text, str(p))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{line}: malformed YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys")
    overridden: dict[str, str] = {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _set(data, keys, value)
        overridden[".".join(keys)] = text
    unknown = _unknown_keys(cls, data, "")
    if unknown:  # the first in the file, whatever its depth (_build meets a level's own keys before its sections')
        key, known = min(unknown, key=lambda u: lines.get(u[0], math.inf))
        raise _blame(_keyed(ConfigError(f"unknown key '{key}' (known keys here: {', '.join(known)})"), key), name,
                     lines, overridden) from None
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise _blame(e, name, lines, overridden) from None


def _unknown_keys(cls: type, data: dict, where: str) -> list[tuple[str, list[str]]]:
    """Each dotted key in `data` that config class `cls` does not have, with the keys its level does have."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    out = []
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if name not in fields:
            out.append((key, list(fields)))
        elif isinstance(value, dict) and fields[name].default_factory is not dataclasses.MISSING:
            default = fields[name].default_factory()
            if dataclasses.is_dataclass(default):
                out += _unknown_keys(type(default), value, key)
    return out


def _blame(error: ConfigError, name: str, lines: dict[str, int], overridden: dict[str, str]) -> ConfigError:
    """`error` prefixed with what set its key's value: an override, else the file's line for that key (or for its
    nearest section), else the file's name alone (a default value)."""
    key = getattr(error, "key", None) or ""
    parts = key.split(".")
    prefixes = [".".join(parts[:k]) for k in range(len(parts), 0, -1)]
    override = next((overridden[k] for k in prefixes if k in overridden), None) or next(
        (text for k, text in overridden.items() if key and k.startswith(key + ".")), None)  # a section's check
    if override is None and len(parts) > 1 and key not in lines:  # a key no one set, checked because of a sibling
        section = ".".join(parts[:-1]) + "."  # that was set (--set critic.backend=openai -> critic.base_url)
        siblings = [text for k, text in overridden.items() if k.startswith(section) and k.count(".") == key.count(".")]
        override = siblings[0] if len(siblings) == 1 else None
    if override is None:  # a value that is fine alone, too large for what another key chose
        override = next((overridden[k] for k in getattr(error, "also", ()) if k in overridden), None)
    if override is not None:
        return ConfigError(f"--set {override}: {error}")
    line = next((lines[k] for k in prefixes if k in lines), None)
    return ConfigError(f"{name}{f':{line}' if line else ''}: {error}")


def locate_error(error: ConfigError, path: str | Path | None, overrides: list[str] | None = None) -> ConfigError:
    """A keyed error found after `load_config(cls, path, overrides)` (see `config_error`), placed the same way
    load_config places its own: at the --set that gave the value, else the config file's line. Errors without a key
    come back unchanged."""
    if getattr(error, "key", None) is None:
        return error
    lines: dict[str, int] = {}
    if path is not None and Path(path).exists():
        lines = _key_lines(Path(path).read_text())
    overridden = {".".join(parse_override(text)[0]): text for text in overrides or []}
    return _blame(error, str(path) if path else "config", lines, overridden)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------ annotated YAML
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the class source: the one on the field's own line(s), continued on the
    comment-only lines right under it, else the comment lines right above the field. So a note written above a field
    is set off from a commented field before it by a blank line. The dataclasses document their fields this way
    (paper constants, [R] reconstructions), and `annotated_yaml` shows those notes to users who never open the
    source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source shipped (a frozen app): values without notes
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))

    def block(start: int, step: int) -> list[int]:  # consecutive comment-only lines from `start` on
        lines = []
        while start in comments and start not in code_lines:
            lines.append(start)
            start += step
        return lines

    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own = [i for i in range(node.lineno, node.end_lineno + 1) if i in comments]
            if own:  # a trailing comment continues on the comment-only lines under it
                own += block(node.end_lineno + 1, 1)
            above = sorted(block(node.lineno - 1, -1))
            if above and above[0] - 1 in comments:  # ...that is the field above's continuation, not this one's
                above = []
            out[node.target.id] = " ".join(comments[i] for i in own or above)
    return out


def _optional_section(hint: Any) -> type | None:
    """X for a hint `X | None` where X is a dataclass whose fields all have defaults, else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(hint)) == 2 and dataclasses.is_dataclass(args[0]) and all(
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            for f in dataclasses.fields(args[0])):
        return args[0]
    return None


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 20).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text  # a bare scalar ends its document with "..."


def annotated_yaml(cfg: Any, width: int = 120) -> str:
    """`cfg` as a YAML config file, every key with its field's comment: what `selfalign run RECIPE --help` and
    `--print-config` show. `load_config` reads it back to the same config."""
    return _annotated(cfg, width, "")


def _annotated(cfg: Any, width: int, indent: str) -> str:
    notes: dict[str, str] = {}
    for base in reversed(type(cfg).__mro__):  # a subclass's own note wins
        if dataclasses.is_dataclass(base):
            notes.update(field_comments(base))
    hints = typing.get_type_hints(type(cfg))
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        head = f"{indent}{f.name}:" if dataclasses.is_dataclass(value) else f"{indent}{f.name}: {_yaml_value(value)}"
        note = notes.get(f.name, "")
        if typing.get_origin(hints.get(f.name)) is typing.Literal:
            choices = "one of: " + ", ".join(map(str, typing.get_args(hints[f.name])))
            note = f"{note} ({choices})" if note else choices
        if note and len(head) + len(note) + 4 <= width:
            head += f"  # {note}"
        elif note:  # too long for one line: wrapped above the key
            lines += textwrap.wrap(note, width, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        lines.append(head)
        if dataclasses.is_dataclass(value):
            lines.append(_annotated(value, width, indent + "  "))
        elif value is None and (section := _optional_section(hints.get(f.name))):
            # an optional section left out (e.g. `lora: null`) still shows its keys, commented out, so a user
            # learns what to set without opening the source
            lines += [f"{indent}#   {line[len(indent):]}" for line in
                      _annotated(section(), width - 4, indent).splitlines()]
    return "\n".join(lines)
