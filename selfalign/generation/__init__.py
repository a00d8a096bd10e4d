"""Generation behind one interface: local backends (the transformers reference loop and the lean continuous-batching
loop) and an OpenAI-compatible HTTP backend."""

from __future__ import annotations

from selfalign.generation.base import (DeferredGenerator, Generator, SamplingParams, check_generator_section,
                                       check_output_file, check_sampling_section, generate_to_file, response_key)

BACKENDS = ("auto", "lean", "transformers", "openai", "vllm")
# the backends that run the model in this process: make_generator builds them itself, and `processes` spreads them
# over worker processes (generation/parallel.py)
IN_PROCESS_BACKENDS = ("auto", "lean", "transformers")
# sequences decoded together by default: the lean loop keeps every slot busy, so it profits from more of them
DEFAULT_BATCH_SIZE = {"lean": 128, "transformers": 16}
# on a GPU each decode step has a fixed cost (launch, sampling over the vocabulary), so more rows per step pay; 256 is
# the batch measured on an H200 (benchmarks/RESULTS.md); the cache still shrinks to fit its memory cap
# (lean_backend.kv_cache_budget)
LEAN_CUDA_BATCH_SIZE = 256


# where the lean loop was measured faster than transformers (benchmarks/RESULTS.md "Fast generation"); elsewhere
# (mps, xpu, ...) "auto" keeps the reference
LEAN_MEASURED_DEVICES = ("cpu", "cuda")


def auto_backend(device, model) -> str:
    """The local backend "auto" picks for `model` on `device` (a torch.device): "lean" or "transformers"."""
    from selfalign.generation.lean_decoder import supports

    return "lean" if device.type in LEAN_MEASURED_DEVICES and supports(model) else "transformers"


def default_batch_size(backend: str, device) -> int:
    """Sequences a local backend decodes together when the caller gives no batch_size (device: a torch.device)."""
    return LEAN_CUDA_BATCH_SIZE if backend == "lean" and device.type == "cuda" else DEFAULT_BATCH_SIZE[backend]


def make_generator(backend: str = "auto", model: str | None = None, **options) -> Generator:
    """Build a generator by backend name. Options go to the backend's constructor; batch_size=None takes the
    backend's default. processes=N (> 1) runs a local backend in N worker processes, one per GPU (each with that
    batch_size), and deals the prompts between them (generation/parallel.py).

    "auto" is the fastest local backend measured for the machine (benchmarks/RESULTS.md, "Fast generation"): the lean
    loop for the model families it supports, else transformers. Measured: on this project's 2-core CPU lean is ~5x
    transformers' batched generate; on an H200 (CUDA-graph steps) 12.3x / 5.5x transformers' generate and 4.0x / 1.7x
    its static-cache setting (which compiled little under transformers 5.17), at SmolLM2-135M / 1.7B shapes."""
    processes = options.pop("processes", None) or 1
    if processes > 1:  # one generator per GPU, in worker processes (generation/parallel.py)
        from selfalign.generation.parallel import ParallelGenerator

        return ParallelGenerator(backend, model, processes, **options)
    if backend in IN_PROCESS_BACKENDS:
        from selfalign.generation.lean_backend import LeanGenerator
        from selfalign.generation.lean_decoder import supports
        from selfalign.generation.transformers_backend import TransformersGenerator

        batch_size = options.pop("batch_size", None)
        max_cache_gb = options.pop("max_cache_gb", None)  # lean only: the KV cache's memory cap
        # (built on the CPU default first: its device is only known once the model is loaded)
        reference = TransformersGenerator(model=model, batch_size=batch_size or DEFAULT_BATCH_SIZE["transformers"],
                                          **options)
        picked = auto_backend(reference.device, reference.model) if backend == "auto" else backend
        if picked == "transformers":
            if max_cache_gb is not None:
                import sys

                print("selfalign: max_cache_gb applies to the lean backend only; the transformers backend sizes its "
                      "cache per batch (lower batch_size to use less memory)", file=sys.stderr)
            return reference
        if not supports(reference.model):
            from selfalign.errors import SelfalignError

            raise SelfalignError(f"--backend lean supports llama and qwen2 models; '{model}' is "
                                 f"{reference.model.config.model_type} (use --backend transformers)")
        lean = LeanGenerator(model=model, batch_size=batch_size or default_batch_size("lean", reference.device),
                             model_obj=reference.model, tokenizer=reference.tokenizer, max_cache_gb=max_cache_gb)
        lean.model_path = reference.model_path  # the weights it was handed came from there
        return lean
    if backend == "openai":
        from selfalign.generation.openai_backend import OpenAIGenerator

        options.pop("batch_size", None)  # the endpoint batches; concurrency= bounds the requests in flight
        return OpenAIGenerator(model=model, **options)
    if backend == "vllm":  # optional: only when the user has vllm (a CUDA machine); never chosen by "auto"
        from selfalign.generation.vllm_backend import VLLMGenerator

        options.pop("batch_size", None)  # vLLM schedules its own batches (and sizes its own KV cache)
        options.pop("max_cache_gb", None)
        options.pop("device", None)
        return VLLMGenerator(model=model, **options)
    from selfalign.errors import SelfalignError

    raise SelfalignError(f"unknown generation backend '{backend}' (choose from {', '.join(BACKENDS)})")


def check_backend_options(backend: str, options: dict) -> None:
    """Refuse option names that make_generator(backend, ...) would not take, before anything loads: a typo in a
    recipe's critic options would otherwise surface as a TypeError when the critic stage starts, hours in. vLLM
    hands every other option to its engine, so its options are not checked here."""
    import inspect

    from selfalign.errors import SelfalignError

    if backend in IN_PROCESS_BACKENDS:
        from selfalign.generation.transformers_backend import TransformersGenerator as cls

        extra = {"max_cache_gb"}  # make_generator's own: the lean loop's cache cap
    elif backend == "openai":
        from selfalign.generation.openai_backend import OpenAIGenerator as cls

        extra = set()
    else:
        return
    # batch_size and processes are keys of every section that generates, not options
    allowed = (set(inspect.signature(cls.__init__).parameters) | extra) - {"self", "model", "model_obj", "tokenizer",
                                                                           "batch_size", "processes"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise SelfalignError(f"backend '{backend}' has no option {', '.join(unknown)} (options: "
                             f"{', '.join(sorted(allowed))})")
    if cls.__name__ == "TransformersGenerator":  # values a local model would refuse only once its stage starts
        from selfalign.models import pick_device, pick_dtype

        if "dtype" in options:
            pick_dtype(str(options["dtype"]))
        if "device" in options:
            pick_device(str(options["device"]))
        cap = options.get("max_cache_gb", 1)
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:  # NaN fails too
            raise SelfalignError(f"max_cache_gb must be a number above 0, not {cap!r}")


__all__ = ["BACKENDS", "DEFAULT_BATCH_SIZE", "DeferredGenerator", "IN_PROCESS_BACKENDS", "LEAN_CUDA_BATCH_SIZE",
           "Generator",
           "SamplingParams", "auto_backend", "check_backend_options", "check_generator_section", "check_output_file",
           "check_sampling_section",
           "default_batch_size", "generate_to_file", "make_generator", "response_key"]
