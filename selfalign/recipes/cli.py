"""`selfalign run RECIPE CONFIG --run-dir DIR [--set key=value ...]`."""

from __future__ import annotations

import json


def cmd_run(args) -> int:
    from selfalign import recipes
    from selfalign.config import load_config, locate_error
    from selfalign.errors import ConfigError

    module = recipes.get(args.recipe)
    config = load_config(module.Config, args.config, args.set)
    try:
        summary = module.run(config, args.run_dir)
    except ConfigError as e:  # e.g. a model that is not on this machine: point at the line or --set that named it
        raise locate_error(e, args.config, args.set) from None
    print(json.dumps(summary, indent=2, default=str))
    return 0


def register(sub) -> None:
    from selfalign import recipes

    names = list(recipes.available())
    if not names:
        return
    p = sub.add_parser("run", help="run a recipe (" + ", ".join(names) + ") from a YAML config into a run folder",
                       description="Run a recipe into a run folder. The folder holds manifest.json (config, versions, "
                       "seeds, model hashes), one artifact per stage, and the final model in DIR/final/. Killed runs "
                       "resume: run the same command again.")
    p.add_argument("recipe", choices=names)
    p.add_argument("config", help="YAML config (see configs/<recipe>.yaml and configs/<recipe>-smoke.yaml)")
    p.add_argument("--run-dir", required=True, help="run folder (created, or resumed if it exists)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, dotted for sections (e.g. --set train.learning_rate=1e-5)")
    p.set_defaults(fn=cmd_run)
