"""Recipes: one short file per method that composes the shared parts into the paper's pipeline.

Each recipe module defines a config dataclass `Config` (defaults = the paper's constants) and
`run(config, run_dir) -> dict` (a summary). `RECIPES` maps the CLI name to the module.

Configs ship inside the package (selfalign/resources/configs/, the clone's configs/ links there): `<recipe>.yaml`, the
scaled-down real run on the embedded model, and `<recipe>-smoke.yaml`, minutes on a CPU. `config_path("spa-smoke")`
finds one by name, so a pip-installed selfalign runs them without a clone.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from selfalign.errors import ConfigError

RECIPES = {
    "sft": "selfalign.recipes.sft",
    "dpo": "selfalign.recipes.dpo",
    "orpo": "selfalign.recipes.orpo",
    "spa": "selfalign.recipes.spa",
    "srt": "selfalign.recipes.srt",
    "seft": "selfalign.recipes.seft",
}


def available() -> dict[str, str]:
    """Recipes whose module exists (a recipe appears in the CLI only when it is built)."""
    out = {}
    for name, module in RECIPES.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise
        out[name] = module
    return out


def get(name: str):
    return importlib.import_module(RECIPES[name])


CONFIG_DIR = Path(__file__).resolve().parent.parent / "resources" / "configs"


def shipped_configs(recipe: str | None = None) -> list[str]:
    """Names of the configs that ship with the package (all, or one recipe's: `spa`, `spa-smoke`)."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    return [n for n in names if recipe is None or n == recipe or n.startswith(recipe + "-")]


def config_path(spec: str | Path) -> Path:
    """A config file: a path, else a shipped config's name (`spa-smoke`, or `spa-smoke.yaml`)."""
    path = Path(spec)
    if path.is_file():  # (a run folder named like a shipped config, e.g. --run-dir spa-smoke, is not one)
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    if len(path.parts) == 1 and shipped.exists():
        return shipped
    raise ConfigError(f"{spec}: config file not found, and no shipped config has that name (shipped: "
                      f"{', '.join(shipped_configs())})")
