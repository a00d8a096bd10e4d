"""Check a recipe's inputs before its run folder is made.

A run folder is locked to the config it started with (a resumed run must never mix two configs), so an input the
run cannot use has to fail before `Run(...)` writes the manifest. Otherwise a typo in a model name, found after the
data stage, locks the folder to the typo and the fixed config needs a new --run-dir.

Each recipe lists the models, judges, backends and templates it will use in its `check_inputs(config)`, with the
config key each value came from; every check here raises a `ConfigError` tagged with that key, so the CLI can point
at the config file's line or the `--set` that gave the value. Models are resolved (a packaged GGUF is converted once,
as the run would) but no weights are loaded. Data files are read and split by the recipe's `prepare_data(config)`,
also before the folder exists (`common.start_run`); their own errors already name file, line and field.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from selfalign.config import config_error
from selfalign.errors import SelfalignError
from selfalign.evaluation.stage import EvalConfig

# a policy is trained, so it answers through a local backend; "openai" is for critics and judges only
LOCAL_BACKENDS = ("auto", "lean", "transformers", "vllm")
API_BACKEND = "openai"


def model(key: str, spec: str) -> None:
    """A local model spec resolves to weights on this machine (short name, folder, .gguf, cached hub id)."""
    from selfalign.models import resolve_model

    if not str(spec).strip():  # resolve_model would take an empty spec for the default model, silently
        raise config_error(key, "empty model spec (give a short name such as smollm2-135m, a folder or a .gguf file)")
    try:
        resolve_model(spec)
    except SelfalignError as e:
        raise config_error(key, e) from None


def _sections(obj, key: str = ""):
    """(dotted key, section) for `obj` ("") and every config section under it, at any depth."""
    from dataclasses import fields, is_dataclass

    yield key, obj
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            yield from _sections(value, f"{key}.{f.name}" if key else f.name)


def training(config) -> None:
    """Every train section (`train`, `round_train`, ..., at any depth) can run where it says: its device exists, and
    its processes can be placed. A stage would otherwise fail only when it starts, after the stages before it ran,
    in a run folder locked to the bad setting."""
    from selfalign import workers
    from selfalign.models import pick_device
    from selfalign.training import distributed
    from selfalign.training.config import TrainConfig

    for key, train in _sections(config):
        if not isinstance(train, TrainConfig):
            continue
        try:
            if train.processes == 1:
                pick_device(train.device)
            else:
                workers.placement(train.processes, train.device)
        except workers.PlacementError as e:
            raise config_error(f"{key}.{e.setting}", e) from None
        except SelfalignError as e:
            raise config_error(f"{key}.device", e) from None
        if train.fsdp:
            try:
                distributed.check_fsdp()
            except SelfalignError as e:
                raise config_error(f"{key}.fsdp", e) from None


def lora_targets(config) -> None:
    """Every train section's LoRA `target_modules` name layers of the model it trains: the section's own (SEFT's
    `reviser.model` for `reviser.adaptive_train`) or the recipe's `model`. peft finds no match only when the stage
    builds its adapters, in a run folder locked to the names. Run after the models are resolved (check_inputs)."""
    from selfalign.models import module_names, resolve_model
    from selfalign.training.config import TrainConfig

    owners = dict(_sections(config))
    for key, train in _sections(config):
        if not isinstance(train, TrainConfig) or train.lora is None:
            continue
        parts = key.split(".")
        owner = next((owners[".".join(parts[:i])] for i in range(len(parts) - 1, -1, -1)
                      if isinstance(getattr(owners[".".join(parts[:i])], "model", None), str)), None)
        if owner is None:
            continue
        folder = resolve_model(owner.model)
        # a LoRA adapter folder names its adapters' weights (q_proj.lora_A), not its base model's layers; a folder
        # without safetensors (a hub cache layout, say) names none: peft will tell
        names = set() if (Path(folder) / "adapter_config.json").exists() else module_names(folder)
        if not names:
            continue
        # peft's rule for a list of names: a module matches its full name or its last components
        missing = [t for t in train.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            layers = sorted({n.rsplit(".", 1)[-1] for n in names if ".layers." in n and "norm" not in n})
            raise config_error(f"{key}.lora.target_modules", f"{', '.join(map(repr, missing))} match"
                               f"{'es' if len(missing) == 1 else ''} no layer of {owner.model} (its layers: "
                               f"{', '.join(layers)})")


def generation(config) -> None:
    """Every generation section (`sampling`, `critic`, `reviser`, `eval`, ..., at any depth: a section with
    `processes` other than a train section) that asks for several processes can have them: a local backend, and a
    GPU for each on a machine with GPUs."""
    from selfalign import workers
    from selfalign.generation import IN_PROCESS_BACKENDS
    from selfalign.training.config import TrainConfig

    # a section without a backend of its own generates with the recipe's sampling backend and options (SRT's
    # self_critique)
    default_backend = getattr(getattr(config, "sampling", None), "backend", "auto")
    default_options = getattr(getattr(config, "sampling", None), "options", {})
    for section_key, obj in _sections(config):
        if getattr(obj, "processes", 1) <= 1 or isinstance(obj, TrainConfig):
            continue
        prefix = f"{section_key}." if section_key else ""
        key = f"{prefix}processes"
        backend = getattr(obj, "backend", default_backend)
        if backend not in IN_PROCESS_BACKENDS:
            raise config_error(key, f"processes > 1 runs a local backend ({', '.join(IN_PROCESS_BACKENDS)}) once "
                                    f"per GPU, not '{backend}'",
                               also=(f"{prefix}backend" if hasattr(obj, "backend") else "sampling.backend",))
        options = getattr(obj, "options", default_options)
        options_key = f"{prefix}options" if hasattr(obj, "options") else "sampling.options"
        try:
            workers.placement(obj.processes, str(options.get("device", "auto")))
        except workers.PlacementError as e:  # a device given among the options is the options' fault
            raise config_error(key if e.setting == "processes" else options_key, e) from None
        except SelfalignError as e:  # a device this machine does not have
            raise config_error(options_key if "device" in options else key, e) from None


def backend(key: str, name: str, allowed: tuple[str, ...] = LOCAL_BACKENDS, options: dict | None = None) -> None:
    """A backend by name (config key `key`, e.g. `sampling.backend`), and the constructor options its section gives
    it (the sibling key `options`)."""
    if name not in allowed:
        raise config_error(key, f"unknown backend '{name}' here (choose from {', '.join(allowed)})")
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        raise config_error(key, "backend 'vllm' needs the vllm package (pip install vllm, on a CUDA machine)")
    if options:
        from selfalign.generation import check_backend_options

        try:
            check_backend_options(name, options)
        except SelfalignError as e:
            raise config_error(f"{key.rsplit('.', 1)[0]}.options", e) from None


# Whether an API endpoint (critic, labeler, judge) is sent one request: yes before a run folder is made, no when a
# run resumes. A resumed run's config is locked anyway, and its endpoint may be down while stages that do not use it
# (training, local evaluation) run; a stage that needs it fails then, and the same command resumes once it answers.
_probe_endpoints: contextvars.ContextVar[bool] = contextvars.ContextVar("probe_endpoints", default=True)


@contextlib.contextmanager
def endpoints_not_contacted():
    token = _probe_endpoints.set(False)
    try:
        yield
    finally:
        _probe_endpoints.reset(token)


def judge(key: str, name: str, options: dict) -> None:
    """A judge by name with its options; `key` names the judge, and its options sit under `key`_options."""
    from selfalign.judges import check_judge

    try:
        check_judge(name, options, endpoint="refuse" if _probe_endpoints.get() else "skip")
    except SelfalignError as e:
        text = str(e)
        if "named by api_key_env" in text:
            where = f"{key}_options.api_key_env"
        elif "/models: " in text and "base_url" in options:  # the endpoint's answer: blame the URL that was given
            where = f"{key}_options.base_url"
        elif "has no option" in text:
            where = f"{key}_options"
        else:
            where = key
        raise config_error(where, e) from None


def evaluation(key: str, config: EvalConfig) -> None:
    """An `eval:` section: its backend and judge (nothing to check when it evaluates no instruction)."""
    if config.instructions:
        from selfalign.data.loaders import load_alpaca_eval_set

        available = len(load_alpaca_eval_set())
        if config.instructions > available:  # a seeded subset larger than the set would silently be all of it
            problem = f"{config.instructions} is more than the {available} AlpacaEval instructions"
            if _probe_endpoints.get():  # a new run (see above); a run started before this check resumes, said
                raise config_error(f"{key}.instructions", problem)
            print(f"selfalign: note: {key}.instructions: {problem}: its evaluations use all {available}",
                  file=sys.stderr)
        backend(f"{key}.backend", config.backend, options=config.options)
        judge(f"{key}.judge", config.judge, config.judge_options)


def generator(key: str, backend_name: str, model_spec: str, options: dict, base_url: str | None = None,
              api_key_env: str | None = None) -> None:
    """A model that only generates (a critic): local, or any OpenAI-compatible endpoint, which must answer one
    GET /models before a new run folder is made (a critic that is down would otherwise fail the run after its first
    stages, with the folder locked to this config). A base_url given to a local backend is refused: it would be
    ignored."""
    from selfalign.generation import check_backend_options, make_generator

    backend(f"{key}.backend", backend_name, LOCAL_BACKENDS + (API_BACKEND,))
    try:
        check_backend_options(backend_name, options)
    except SelfalignError as e:
        raise config_error(f"{key}.options", e) from None
    if backend_name != API_BACKEND:
        if base_url:
            raise config_error(f"{key}.base_url", f"set, but {key}.backend is '{backend_name}', a local backend "
                                                  f"that would ignore it (use backend: openai for an endpoint)")
        model(f"{key}.model", model_spec)
        return
    try:
        endpoint = make_generator(API_BACKEND, model=model_spec or None, base_url=base_url, api_key_env=api_key_env,
                                  **options)
    except SelfalignError as e:
        raise config_error(f"{key}.api_key_env" if "named by api_key_env" in str(e) else f"{key}.base_url", e) from None
    try:
        if _probe_endpoints.get():
            endpoint.check_reachable()
    except SelfalignError as e:
        raise config_error(f"{key}.base_url", e) from None
    finally:
        endpoint.close()


def template(key: str, name: str, load: Callable[[str], str]) -> None:
    try:
        load(name)
    except SelfalignError as e:
        raise config_error(key, e) from None
