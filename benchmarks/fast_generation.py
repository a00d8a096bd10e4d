"""Generation throughput: transformers `generate` (dynamic cache), transformers static cache + torch.compile, and
selfalign's lean backend, on the same real prompts, in one run.

    python benchmarks/fast_generation.py                                    # issue #8's CPU workload
    python benchmarks/fast_generation.py --random-init smollm2-1.7b --device cuda --batch-size 256 \
        --hf-batch-size 256 --prompts 256 --prompt-tokens 128 --n 1 --max-new-tokens 256 --check-graphs 16
                                                                            # issue #8's GPU anchor (speed ignores weights)
    benchmarks/gpu_run.sh                                                   # both GPU shapes, as one device call

Workload (default): the first 64 prompts of prompts/unlabelled_pool.jsonl, 2 samples each, up to 200 new tokens,
temperature 0.7 / top_p 0.9, the embedded model, fp32 on CPU. Tokens/s counts generated tokens up to and including
the end-of-turn token. The transformers rows run the backend's own loop (length-sorted, left-padded batches of
--hf-batch-size sequences); the lean row decodes --batch-size sequences at once with continuous batching. Greedy
parity is checked on the first --parity prompts (token-identical answers, lean vs transformers). --prompt-tokens N
makes every prompt N tokens long after the chat template (a few come out a token or two shorter) (real pool text, consecutive prompts joined then cut), as
in the issue's GPU anchor. On CUDA the lean backend replays CUDA graphs; --check-graphs N compares N greedy answers
and N seeded samples from graph replay with the same bucketed steps run eagerly (they must be identical), and the
lean row's last column is the time spent capturing graphs within the timed call. The static+compile row is timed
on its second identical call; its first call (compile included) is the last column.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import statistics
import subprocess
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from selfalign.data.loaders import load_prompts, shared_data_dir  # noqa: E402
from selfalign.generation import DEFAULT_BATCH_SIZE, SamplingParams  # noqa: E402
from selfalign.generation import triton_kernels  # noqa: E402
from selfalign.generation.lean_backend import LeanGenerator  # noqa: E402
from selfalign.generation.transformers_backend import TransformersGenerator  # noqa: E402
from selfalign.models import load_tokenizer  # noqa: E402

ABLATION = " [overlap ablation]"  # marks the --overlap-ablation row, which the repeat ratios leave out
STEP_ABLATION = " [{} ablation]"  # the --attention-ablation rows (sdpa attention, triton kernels), left out likewise
SHAPES = {  # real SmolLM2 configurations, for random-init speed runs
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32),
}


def random_model(shape: str, device: str, dtype: torch.dtype, initializer_range: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                      initializer_range=initializer_range, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 1.7B random weights take minutes on a CPU
        return LlamaForCausalLM(cfg).to(dtype=dtype).eval()


def fixed_length_prompts(prompts, tokenizer, n_tokens: int):
    """Prompts of n_tokens after the chat template (a token or two fewer where re-encoding merges tokens): each joins the texts of the pool's prompts from its
    own onwards (real text) and is cut to the length, as transformers' generate benchmarks use fixed-length
    prompts."""
    from selfalign.data.records import Prompt
    from selfalign.models import encode_prompt

    def templated(text: str) -> int:  # the prompt's length as the generators encode it
        return len(encode_prompt(tokenizer, [{"role": "user", "content": text}]))

    overhead = templated("")
    out = []
    for k, p in enumerate(prompts):
        ids: list[int] = []
        for q in prompts[k:] + prompts[:k]:
            ids += tokenizer.encode(q.text + "\n", add_special_tokens=False)
            if len(ids) >= n_tokens:
                break
        want = n_tokens - overhead
        while True:  # decoding then re-encoding can merge tokens: trim until the templated length is exact or less
            text = tokenizer.decode(ids[:want])
            got = templated(text)
            if got <= n_tokens or want <= 1:
                break
            want -= got - n_tokens
        out.append(Prompt(id=p.id, messages=[{"role": "user", "content": text}]))
    return out


def timed(gen, prompts, params) -> tuple[int, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = gen.generate(prompts, params, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(r.num_tokens or 0 for r in out), time.perf_counter() - t0


def lean_row(lean, args, prompts, params, record, tag: str = "", first_call: float | None = None) -> None:
    toks, secs = timed(lean, prompts, params)
    overlap = ", overlapped" if lean.overlap else ""
    dec = lean.decoder
    how = ", triton kernels" if dec.kernels == "triton" else ", sdpa attention" if dec.span_attention == "sdpa" else ""
    record(f"selfalign lean, continuous batching, {lean.last_slots} slots, {lean.decode} steps{how}{overlap}{tag}",
           toks, secs, first_call)


# The --attention-ablation alternatives to the default fixed-span steps (matmul attention, torch ops), as
# LeanGenerator options. The Triton kernels run last in a shape's run (triton_checks): a kernel fault would leave the
# CUDA context unusable for every row after it.
SDPA_VARIANT = {"sdpa attention": dict(span_attention="sdpa")}
TRITON_VARIANT = {"triton kernels": dict(kernels="triton")}


def attention_ablation(build, args, prompts, params, record, lean, tag: str, variants: dict[str, dict]) -> None:
    """The lean row again with each of `variants` in its fixed-span steps, timed on its second call like the main
    row; plus how many greedy answers it shares with the main row's steps (bf16 rounds them differently, so a few
    may part on random weights). A variant that fails is reported and the next one still runs."""
    decode = lean.decode if lean.decode != "grouped" else "static"  # grouped steps have no span (CPU dry run)
    for name, options in variants.items():
        alt = None
        try:
            alt = build(LeanGenerator, args.batch_size, decode=decode, **options)
            alt.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=4), progress=False)  # warm-up
            first_call = timed(alt, prompts, params)[1]  # captures its graphs
            lean_row(alt, args, prompts, params, record, tag + STEP_ABLATION.format(name), first_call)
            k = args.check_graphs or 4
            greedy = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
            a, b = (g.generate(prompts[:k], greedy, progress=False) for g in (lean, alt))
            print(f"{name} vs the default steps: {sum(x.response == y.response for x, y in zip(a, b))}/{k} greedy "
                  f"answers identical", flush=True)
        except Exception:  # noqa: BLE001 - an ablation that cannot run must not cost the rest of the device call
            traceback.print_exc()
            print(f"{name} ablation FAILED", flush=True)
        finally:
            if alt is not None:  # its KV cache is gigabytes: free it before the next generator sizes its own
                alt.close()


def triton_checks(build, args, prompts, params, record, lean) -> None:
    """The fused Triton kernels (LeanDecoder kernels="triton"): the ablation row, teacher-forced parity and, on a GPU,
    the refill check, each reported and contained on failure. (Through the interpreter on the CPU dry run the refill
    check would take most of an hour.)"""
    attention_ablation(build, args, prompts, params, record, lean, "", TRITON_VARIANT)
    if args.teacher_forced:
        teacher_forced_check(args, prompts[:args.teacher_forced], min(64, args.max_new_tokens), [("matmul", "triton")])
    if args.check_refills and args.device != "cpu":
        try:  # the fused kernels' attention reads each row's own positions: refills must keep them right
            refill_check(build, args, args.check_refills, kernels="triton")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print("refill check with triton kernels FAILED", flush=True)


def refill_check(build, args, k: int, **options) -> None:
    """Continuous batching under the default steps (CUDA: graph replay, overlapped), against eager bucketed steps in
    the plain loop: k real prompts at their own lengths through k/4 slots, n=2 seeded samples and greedy answers with
    stop strings, so sequences end mid-run, slots refill and survivors move. The anchor workload cannot show this:
    there every prompt has the same length and every sequence ends on the same step. Random weights never pick the
    end-of-turn token, so with --random-init 1% of the vocabulary is made end tokens (answers then end after ~70
    sampled tokens on average). Rows that part are counted, with the first token where they do: overlap's wasted rows
    change a step's row bucket, and in bf16 another matmul shape can flip a near-tie."""
    pool = load_prompts(shared_data_dir() / "prompts" / "unlabelled_pool.jsonl", limit=k)
    slots = max(2, k // 4)
    fast = build(LeanGenerator, slots, **options)
    eager = build(LeanGenerator, slots, decode="static", overlap=False, **options)
    if args.random_init:
        vocab = fast.decoder.lm_head.shape[0]
        ends = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[:vocab // 100].tolist()
        for g in (fast, eager):
            g.eos_ids = sorted(set(g.eos_ids) | set(ends))
    for name, p in (("seeded samples, n=2", SamplingParams(temperature=0.7, top_p=0.9, n=2, seed=1,
                                                           max_new_tokens=args.max_new_tokens)),
                    ("greedy, stop strings", SamplingParams(temperature=0, stop=(". ", "\n"),
                                                            max_new_tokens=args.max_new_tokens))):
        a = fast.generate(pool, p, progress=False)
        b = eager.generate(pool, p, progress=False)
        same = [(x.response, x.num_tokens, x.finish_reason) == (y.response, y.num_tokens, y.finish_reason)
                for x, y in zip(a, b)]
        parted = [next((j for j, (u, v) in enumerate(zip(x.response, y.response)) if u != v),
                       min(len(x.response), len(y.response))) for x, y, ok in zip(a, b, same) if not ok]
        lengths = sorted(r.num_tokens for r in b)
        print(f"refill check{f' {options}' if options else ''}, {name}: {sum(same)}/{len(same)} answers identical "
              f"({fast.decode}"
              f"{' overlapped' if fast.overlap else ''} vs static eager plain loop; {k} prompts through {slots} "
              f"slots; answers of {lengths[0]}-{lengths[-1]} tokens, median {lengths[len(lengths) // 2]}, "
              f"{sum(r.finish_reason == 'stop' for r in b)} ended early)"
              f"{f'; differing rows part at character {parted}' if parted else ''}", flush=True)
    fast.close()
    eager.close()


def run_lean(build, args, prompts, params, record, decode: str = "auto", tag: str = ""):
    """The lean row (and, with --check-graphs, its parity with the eager bucketed steps); returns the generator."""
    lean = build(LeanGenerator, args.batch_size, decode=decode)
    lean.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=4), progress=False)  # warm-up
    first_call = None
    if lean.graphs is not None and lean.graphs.capture:
        # graphs are captured on first use and kept with the cache for the next call (LeanGenerator.keep_cache):
        # like the static+compile row, the timed call is the second; the first one's seconds include the capture
        # capture_seconds adds up over calls: leave out the warm-up call's small graph. (The graphs themselves are
        # the full call's only: its larger cache replaced the warm-up's, which drops graphs captured against it.)
        warm_up_s = lean.graphs.capture_seconds
        first_call = timed(lean, prompts, params)[1]
        print(f"lean first call {first_call:.1f} s, of which graph capture "
              f"{lean.graphs.capture_seconds - warm_up_s:.1f} s ({len(lean.graphs.graphs)} graphs)", flush=True)
    lean_row(lean, args, prompts, params, record, tag, first_call)
    if args.overlap_ablation:  # the same generator (and graphs) with the other host/device scheduling
        lean.overlap = not lean.overlap
        lean_row(lean, args, prompts, params, record, tag + ABLATION)
        lean.overlap = not lean.overlap
    if args.attention_ablation:
        attention_ablation(build, args, prompts, params, record, lean, tag, SDPA_VARIANT)
    if lean.device.type == "cuda":
        count_syncs(lean, prompts, params)
    if args.check_graphs and lean.decode != "static":
        # CUDA: graph replay (overlapped) vs eager steps in the plain loop; CPU: grouped vs bucketed steps
        eager = build(LeanGenerator, args.batch_size, decode="static", overlap=False)
        for name, p in (("greedy answers", SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)),
                        ("seeded samples", params)):
            a = lean.generate(prompts[:args.check_graphs], p, progress=False)
            b = eager.generate(prompts[:args.check_graphs], p, progress=False)
            same = sum(x.response == y.response for x, y in zip(a, b))
            print(f"{lean.decode}{' overlapped' if lean.overlap else ''} vs static-eager plain-loop parity: "
                  f"{same}/{len(a)} {name} identical", flush=True)
    return lean


def teacher_forced_check(args, prompts, steps: int, variants: list[tuple[str, str]]) -> None:
    """The lean decode steps against the transformers forward pass, where answers cannot be compared token by token
    (random weights): greedy-decode `steps` tokens per prompt with LeanDecoder (prefill, then the eager decode_step
    that graph replay captures: with a span on CUDA, as --check-graphs compares), then run the transformers model over
    prompt + those tokens and compare next-token logits at every decoded position.

    It runs in fp32 on a model of its own: in bf16 the two implementations' rounding differs by up to 1.6 logits on
    random weights, and at the usual init (std 0.02) a random model's attention barely moves its logits, so a wrong
    position goes unseen. With fp32 and std 0.05 (random-init runs), a CPU check gave max |diff| 4e-5 and 64/64
    argmax agreement, and decoding at positions shifted by one gave 6.7 and 8/64."""
    if args.random_init:
        model = random_model(args.random_init, args.device, torch.float32, initializer_range=0.05)
        lean = LeanGenerator(args.model, model_obj=model, tokenizer=load_tokenizer(args.model, "left"))
    else:
        lean = LeanGenerator(args.model, dtype="float32", device=args.device)
        model = lean.model  # its weights became views into the decoder's fused tensors: the same values
    dec = lean.decoder
    encoded = lean.encode(prompts, steps)
    lengths = [len(e) for e in encoded]
    dec.allocate(len(encoded), max(lengths) + steps)
    ids = torch.zeros(len(encoded), max(lengths), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, :len(e)] = torch.tensor(e)
    # variants: (span_attention, kernels) pairs; they differ only in the fixed-span steps, which the default loop runs
    # on CUDA and which the alternatives run anywhere (on the CPU dry run too)
    for attention, kernels in variants:
        variant = "triton kernels" if kernels == "triton" else f"{attention} span attention"
        fixed_span = lean.graphs is not None or (attention, kernels) != ("matmul", "torch")
        try:
            dec.span_attention = attention
            dec.set_kernels(kernels)
            tf_variant(dec, model, encoded, lengths, ids, steps, variant, fixed_span)
        except Exception:  # noqa: BLE001 - report it; the device call's other checks still run
            traceback.print_exc()
            print(f"teacher-forced check ({variant}) FAILED", flush=True)
    dec.release()


def tf_variant(dec, model, encoded, lengths, ids, steps: int, variant: str, fixed_span: bool) -> None:
    """teacher_forced_check for one variant of the decoder's steps (fixed_span: the steps graphs replay)."""
    device = dec.device
    with torch.inference_mode():
        hidden = dec.forward_full(ids.to(device), list(range(len(encoded))))
        logits = [dec.logits(hidden[torch.arange(len(encoded)), torch.tensor(lengths) - 1]).float()]
        chosen = [logits[0].argmax(dim=-1)]
        for t in range(steps - 1):
            span = max(lengths) + t + 1 if fixed_span else None
            logits.append(dec.decode_step(chosen[-1], torch.tensor(lengths, device=device) + t, span=span).float())
            chosen.append(logits[-1].argmax(dim=-1))
        lean_logits, tokens = torch.stack(logits, dim=1), torch.stack(chosen, dim=1)  # [B, steps, V], [B, steps]
        worst, agree, near = 0.0, 0, 0
        for row, e in enumerate(encoded):
            full = torch.tensor(e + tokens[row].tolist(), device=device)[None]
            ref = model(full).logits[0, len(e) - 1:len(e) - 1 + steps].float()
            worst = max(worst, (ref - lean_logits[row]).abs().max().item())
            agree += (ref.argmax(dim=-1) == tokens[row]).sum().item()
            near += (ref.gather(1, tokens[row][:, None])[:, 0] >= ref.max(dim=-1).values - 0.1).sum().item()
    n = len(encoded) * steps
    print(f"teacher-forced lean decode ({variant}) vs transformers forward, fp32 ({len(encoded)} "
          f"prompts x {steps} steps): max |logit diff| {worst:.3g}; argmax agrees at {agree}/{n}; lean choice "
          f"within 0.1 of the best at {near}/{n}", flush=True)


def count_syncs(lean, prompts, params) -> None:
    """Where one lean call makes the host wait for the GPU (torch's sync debug mode warns at each such call, from
    the Python line that made it). In the overlapped loop only the read of each step's tokens should wait, and
    admissions: anything else per step is a stall to fix."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            lean.generate(prompts, params, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught)
    # torch's sync debug mode does not see CUDA event waits, i.e. the overlapped loop's intended wait per step
    print(f"host-device syncs in one lean call ({params.max_new_tokens} new tokens; event waits not counted): "
          f"{sum(where.values())}; "
          f"{', '.join(f'{k} x{n}' for k, n in where.most_common(8)) or 'none'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-init", choices=sorted(SHAPES), help="random weights of this shape (tokenizer: --model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on GPU")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="make every prompt this many tokens (0: as is)")
    ap.add_argument("--check-graphs", type=int, default=0,
                    help="CUDA: compare this many answers from graph replay with the eager bucketed steps")
    ap.add_argument("--teacher-forced", type=int, default=0,
                    help="compare the lean decode steps' logits with a transformers forward pass on this many prompts "
                    "(64 greedy steps each); works with --random-init, where answers cannot be compared token by token")
    ap.add_argument("--overlap-ablation", action="store_true",
                    help="also time the lean row with overlap switched (LeanGenerator.overlap; on by default on CUDA)")
    ap.add_argument("--check-refills", type=int, default=0,
                    help="run this many real prompts through a quarter as many slots, default steps vs eager (see "
                    "refill_check)")
    ap.add_argument("--attention-ablation", action="store_true",
                    help="also time the lean row with SDPA attention in its fixed-span steps (graphs, static)")
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE["lean"],
                    help="lean backend: sequences decoded together (default: the backend's)")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="transformers: sequences per generate() call")
    ap.add_argument("--skip", default="", help="comma list of rows to skip: dynamic,static,lean")
    ap.add_argument("--parity", type=int, default=8, help="prompts for the greedy parity check (0: none)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the dynamic and lean rows this many times, alternating, and report each repeat's "
                    "ratio and their median (this VM's speed drifts by up to 1.5x within an hour)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    dtype = {"auto": torch.float32 if args.device == "cpu" else torch.bfloat16, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    prompts = load_prompts(shared_data_dir() / "prompts" / "unlabelled_pool.jsonl", limit=args.prompts)
    if args.prompt_tokens:
        prompts = fixed_length_prompts(prompts, load_tokenizer(args.model, "left"), args.prompt_tokens)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens, n=args.n, seed=0)

    def build(cls, batch_size, **options):
        tok = load_tokenizer(args.model, "left")
        if args.random_init:
            model = random_model(args.random_init, args.device, dtype)
            return cls(args.model, batch_size=batch_size, model_obj=model, tokenizer=tok, **options)
        return cls(args.model, batch_size=batch_size, dtype=str(dtype).split(".")[1], device=args.device, **options)

    rows = []

    def record(name, toks, secs, extra=None):  # printed at once too: a later row that fails or times out loses nothing
        rows.append((name, toks, secs, extra))
        print(f"row: {name}: {toks} tokens in {secs:.1f} s = {toks / secs:.1f} tokens/s"
              f"{'' if extra is None else f' (first call {extra:.1f} s)'}", flush=True)

    hf = build(TransformersGenerator, args.hf_batch_size)
    hf.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=4), progress=False)  # warm-up
    lean, ratios = None, []
    for repeat in range(args.repeats):
        tag = f" (repeat {repeat + 1})" if args.repeats > 1 else ""
        if "dynamic" not in skip:
            toks, secs = timed(hf, prompts, params)
            record(f"transformers generate, dynamic cache, batch {args.hf_batch_size}{tag}", toks, secs)
        if "lean" in skip:
            continue
        if lean is not None:
            lean_row(lean, args, prompts, params, record, tag)
        else:
            try:
                lean = run_lean(build, args, prompts, params, record, tag=tag)
            except Exception:  # a failed capture: report it, then measure the same bucketed steps without graphs
                traceback.print_exc()
                lean = run_lean(build, args, prompts, params, record, decode="static", tag=tag)
        if "dynamic" not in skip:  # this repeat's last dynamic and last lean rows
            dyn = next(r for r in reversed(rows) if r[0].startswith("transformers generate, dynamic"))
            fast = next(r for r in reversed(rows) if r[0].startswith("selfalign lean")
                        and "ablation]" not in r[0])
            ratios.append(fast[1] / fast[2] / (dyn[1] / dyn[2]))
    if len(ratios) > 1:
        print(f"lean vs dynamic, each repeat: {', '.join(f'{r:.2f}x' for r in ratios)}; median "
              f"{statistics.median(ratios):.2f}x", flush=True)
    if lean is not None:
        if args.parity and not args.random_init:
            greedy = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
            a = hf.generate(prompts[:args.parity], greedy, progress=False)
            b = lean.generate(prompts[:args.parity], greedy, progress=False)
            same = sum(x.response == y.response for x, y in zip(a, b))
            print(f"greedy parity: {same}/{len(a)} answers token-identical (lean vs transformers)")
        if args.teacher_forced:
            teacher_forced_check(args, prompts[:args.teacher_forced], min(64, args.max_new_tokens),
                                 [("matmul", "torch")] + [("sdpa", "torch")] * args.attention_ablation)
        if args.check_refills:
            refill_check(build, args, args.check_refills)
        lean.close()  # its KV cache; the generator itself is kept for the Triton checks' greedy comparison
    if "static" not in skip:
        try:
            # transformers compiles the decode forward itself when the cache is static; on CPU only when asked to
            from transformers import CompileConfig

            compile_config = CompileConfig()
            compile_config._compile_all_devices = True
            hf.model.generation_config.compile_config = compile_config
            hf.model.generation_config.cache_implementation = "static"
            # the first call compiles for the run's own shapes (a static cache's length is prompt + max_new_tokens,
            # and another length compiles again), the second is timed
            compile_s = timed(hf, prompts, params)[1]
            toks, secs = timed(hf, prompts, params)
            record(f"transformers generate, static cache + compile, batch {args.hf_batch_size}", toks, secs,
                   compile_s)
        except Exception:
            traceback.print_exc()
        hf.model.generation_config.cache_implementation = None
    if lean is not None and args.attention_ablation and triton_kernels.available(torch.device(args.device)):
        triton_checks(build, args, prompts, params, record, lean)

    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        cpu = platform.processor()
    if not rows:
        return
    base = rows[0][1] / rows[0][2]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {cpu}, "
          f"{os.cpu_count()} CPUs, device {args.device}, torch {torch.__version__}, "
          f"model {args.random_init or args.model}{' (random init)' if args.random_init else ''}, {dtype}, "
          f"{len(prompts)} prompts x {args.n} samples, max_new_tokens {args.max_new_tokens}, T 0.7 top_p 0.9")
    print("| method | new tokens | seconds | tokens/s | vs first row | first call s (compile or graph capture) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, toks, secs, comp in rows:
        print(f"| {name} | {toks} | {secs:.1f} | {toks / secs:.1f} | {toks / secs / base:.2f}x | "
              f"{'' if comp is None else f'{comp:.0f}'} |")


if __name__ == "__main__":
    main()
