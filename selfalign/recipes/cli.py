"""`selfalign run RECIPE CONFIG --run-dir DIR [--set key=value ...] [--print-config]`.

Each recipe has its own help: its pipeline (the module docstring), its shipped configs, and every config key with
its default and the note from its dataclass field (`selfalign run spa --help`)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path


def cmd_run(args) -> int:
    from selfalign import recipes
    from selfalign.config import annotated_yaml, load_config, locate_error
    from selfalign.errors import ConfigError

    module = recipes.get(args.recipe)
    path = recipes.config_path(args.config)
    try:
        config = load_config(module.Config, path, args.set)
    except ConfigError as e:
        owner = _recipe_whose_config(path)
        if "unknown key" in str(e) and owner not in (None, args.recipe):
            raise ConfigError(f"{e}; {path} looks like a {owner} config (selfalign run {owner} ...)") from None
        raise
    if args.print_config:  # the effective config (file + overrides), as a file that reproduces it
        print(f"# selfalign run {args.recipe} " + shlex.join([str(path)] + [a for o in args.set for a in ("--set", o)]))
        print(annotated_yaml(config))
        return 0
    if not args.run_dir:
        raise ConfigError("--run-dir is required (the folder the run writes and resumes from)")
    try:
        summary = module.run(config, args.run_dir)
    except ConfigError as e:  # e.g. a model that is not on this machine: point at the line or --set that named it
        raise locate_error(e, path, args.set) from None
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _recipe_help(name: str, module) -> tuple[str, str]:
    """(description, epilog) of `selfalign run NAME --help`."""
    from selfalign import recipes
    from selfalign.config import annotated_yaml

    doc = (module.__doc__ or "").strip()
    shipped = ", ".join(recipes.shipped_configs(name)) or "none"
    epilog = (f"shipped configs (give the name as CONFIG): {shipped}\n\n"
              f"config keys with their defaults (the paper's constants where it states them; a note marked [R] is "
              f"a reconstruction, not the paper's setting, see METHODS.md), as a "
              f"YAML file;\nset them in CONFIG or with --set KEY=VALUE (dotted for sections):\n\n"
              + annotated_yaml(module.Config()))
    return doc, epilog


def _recipe_whose_config(path) -> str | None:
    """The first recipe whose config takes every top-level key of the YAML file `path` (None: none, or unreadable)."""
    import dataclasses

    import yaml

    from selfalign import recipes

    try:
        keys = set(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
    except Exception:  # the error being explained is load_config's own; this is only a hint
        return None
    for name in recipes.available():
        if keys <= {f.name for f in dataclasses.fields(recipes.get(name).Config)}:
            return name
    return None


def _example_override(module) -> str:
    """`section.key=value` for a --set example that this recipe's config really has (its first section's first key)."""
    import dataclasses

    config = module.Config()
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section):
            first = dataclasses.fields(section)[0].name
            return f"{f.name}.{first}={getattr(section, first)}"
    return f"{dataclasses.fields(config)[0].name}=..."


def register(sub) -> None:
    from selfalign import recipes

    names = list(recipes.available())
    if not names:
        return
    p = sub.add_parser("run", help="run a recipe (" + ", ".join(names) + ") from a YAML config into a run folder",
                       description="Run a recipe into a run folder. The folder holds manifest.json (config, versions, "
                       "seeds, model hashes), one artifact per stage, and the final model in DIR/final/. Killed runs "
                       "resume: run the same command again. `selfalign run RECIPE --help` lists the recipe's "
                       "pipeline and every config key with its default.")
    per_recipe = p.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name in names:
        module = recipes.get(name)
        description, epilog = _recipe_help(name, module)
        summary = " ".join(description.split("\n\n")[0].split())  # the docstring's first paragraph
        r = per_recipe.add_parser(name, help=summary or name,
                                  description=description, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        shipped = ", ".join(recipes.shipped_configs(name))
        r.add_argument("config", metavar="CONFIG", help=f"YAML config: a path, or a shipped config's name ({shipped})")
        r.add_argument("--run-dir", help="run folder (created, or resumed if it exists); required unless "
                       "--print-config")
        r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override any config field, dotted for sections (e.g. --set {_example_override(module)})")
        r.add_argument("--print-config", action="store_true",
                       help="print the effective config (CONFIG with every --set applied, each key with its note) as "
                       "YAML and exit; save it to start your own config")
        r.set_defaults(fn=cmd_run)
