"""Where one lean decode step's time goes, part by part, at issue #8's GPU workload (256 rows, bf16).

Why: on an H200 the lean loop reached 35.7k tokens/s at the SmolLM2-135M shape but 19.8k at 1.7B, i.e. 12.9 ms per
step where 35k needs 7.3 ms (benchmarks/RESULTS.md, stop 22). A rough floor for that step is 4-5 ms (KV-cache reads,
weights, linear FLOPs), so most of the gap is somewhere else. This times each part of a step on its own, on random
weights of the real shape (speed does not depend on weight values):

- the whole step, as a captured graph replay (CUDA) or the same bucketed step run eagerly (CPU);
- the parts the graph holds, one layer at a time times the layers: the four linear products, the attention as the
  decoder does it (two batched matmuls per layer under a mask) and, as alternatives, SDPA with and without the mask,
  the KV-cache writes, RMSNorm and RoPE; the output head;
- the parts outside the graph: the per-row random numbers and sampling (greedy; T 0.7 top-p 0.9, the benchmark's,
  which sorts the whole vocabulary on CUDA; T 1.0 with no top-p);
- where Triton runs, the same for the fused kernels (LeanDecoder kernels="triton", generation/triton_kernels.py):
  the whole step, and per layer the RoPE + cache write + attention kernel, the two add + RMSNorm and SiLU * up;
- on CUDA, a torch.profiler pass over eager steps: the kernels that take the most device time.

    python benchmarks/step_breakdown.py --shape smollm2-1.7b --device cuda            # a device call (~30 s)
    python benchmarks/step_breakdown.py --shape smollm2-135m --rows 8 --span 64      # a CPU check that it runs

Timings are medians of --repeats runs, each after warm-up. On CUDA each part's --inner calls are captured in one CUDA
graph and its replay is timed with CUDA events, as the step runs them (timed eagerly, tiny kernels would measure
the host's launch rate instead); the whole eager step is the exception, to show what graphs save. The loop's measured
step time also carries the prefill of every prompt (its own row, spread over 256 steps).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fast_generation import SHAPES, random_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from selfalign.generation import SamplingParams, triton_kernels  # noqa: E402
from selfalign.generation.cuda_graphs import DecodeGraphs  # noqa: E402
from selfalign.generation.lean_decoder import LeanDecoder  # noqa: E402
from selfalign.generation.sampling import counter_uniforms, sample_tokens  # noqa: E402


def timer(device: torch.device, repeats: int, inner: int):
    """ms per call of fn: median over `repeats` of `inner` back-to-back calls, after warm-up. On CUDA with graph=True
    the `inner` calls are one captured graph, replayed (falls back to eager calls, with a note, if capture fails)."""
    def ms(fn, graph: bool = True) -> float:
        run, calls = fn, inner
        if device.type == "cuda":
            stream = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graphs asks before a capture
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            if graph:
                try:
                    captured = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(captured):
                        for _ in range(inner):
                            fn()
                    run, calls = captured.replay, 1
                except Exception as err:  # noqa: BLE001 - a part that cannot be captured is still timed
                    print(f"(capture failed, timed eagerly: {type(err).__name__}: {str(err)[:100]})", flush=True)
                    torch.cuda.synchronize()
        else:
            for _ in range(2):
                fn()
        runs = []
        for _ in range(repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    run()
                end.record()
                end.synchronize()
                runs.append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    run()
                runs.append((time.perf_counter() - t0) * 1e3 / inner)
        return statistics.median(runs)
    return ms


def failure(err: Exception) -> str:
    print(f"FAILED: {type(err).__name__}: {err}", flush=True)
    return f"{type(err).__name__}: {str(err)[:80]}".replace("|", "/")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-1.7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--span", type=int, default=256,
                    help="attention span of the step: 128-token prompts halfway through 256 new tokens")
    ap.add_argument("--max-len", type=int, default=384, help="cache length per slot (prompt + new tokens)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for the prefill row")
    ap.add_argument("--steps", type=int, default=256, help="decode steps the prefill is spread over")
    ap.add_argument("--measured-step-ms", type=float, default=None,
                    help="the loop's measured ms per step, for the share column (stop 22: 7.2 at 135M, 12.9 at 1.7B)")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    rows, span = args.rows, args.span
    ms = timer(device, args.repeats, args.inner)

    dec = LeanDecoder(random_model(args.shape, args.device, dtype))
    n_layers = len(dec.layers)
    dec.allocate(rows, args.max_len)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, dec.embed.shape[0], (rows,), generator=gen).to(device)
    # rows at different points of their answers, all within the span (as admission order leaves them)
    positions = (span - 1 - torch.randint(0, min(64, span), (rows,), generator=gen)).to(device)
    results: list[tuple[str, float, str]] = []  # (part, ms per step, how)

    graphs = DecodeGraphs(dec, capture=device.type == "cuda")
    with torch.inference_mode():
        step_ms = ms(lambda: graphs.step(tokens, positions, span), graph=False)  # it replays its own graph
        results.append(("whole decode step (graph replay)" if device.type == "cuda"
                        else "whole decode step (bucketed, eager)", step_ms, "graphs.step"))
        results.append(("whole decode step, eager (launch-bound part = this - replay)",
                        ms(lambda: dec.decode_step(tokens, positions, span), graph=False), "decode_step"))
        fused = triton_kernels if triton_kernels.available(device) else None
        if fused is not None:
            fused_graphs = DecodeGraphs(dec, capture=device.type == "cuda")
            try:  # a failure here is reported in the table; the torch rows still run
                dec.set_kernels("triton")
                results.append(("whole decode step, fused Triton kernels (kernels='triton')",
                                ms(lambda: fused_graphs.step(tokens, positions, span), graph=False), "graphs.step"))
            except Exception as err:  # noqa: BLE001
                results.append(("whole decode step, fused Triton kernels: FAILED", float("nan"), failure(err)))
            finally:
                fused_graphs.reset()
                dec.set_kernels("torch")
        prompt_ids = torch.randint(0, dec.embed.shape[0], (rows, args.prompt_tokens), generator=gen).to(device)
        prefill = ms(lambda: dec.forward_full(prompt_ids, list(range(rows))), graph=False)
        results.append((f"prefill of {rows} x {args.prompt_tokens} tokens, per step of {args.steps}",
                        prefill / args.steps, "forward_full / steps"))

        layer = dec.layers[0]
        x = torch.randn(rows, dec.embed.shape[1], device=device, dtype=dtype)
        h = dec._rms(x, layer["ln1"])
        qkv = F.linear(h, layer["wqkv"], layer["bqkv"])
        inner_width = layer["w2"].shape[1]
        act = torch.randn(rows, inner_width, device=device, dtype=dtype)
        attn_out = torch.randn(rows, dec.n_heads * dec.head_dim, device=device, dtype=dtype)
        per_layer = [
            ("linear: fused q/k/v", lambda: F.linear(h, layer["wqkv"], layer["bqkv"])),
            ("linear: o_proj", lambda: F.linear(attn_out, layer["wo"], layer["bo"])),
            ("linear: fused gate/up", lambda: F.linear(h, layer["w13"])),
            ("linear: down", lambda: F.linear(act, layer["w2"])),
            ("RMSNorm x2 (fp32, unfused)", lambda: (dec._rms(x, layer["ln1"]), dec._rms(x, layer["ln2"]))),
        ]
        q = qkv[:, :dec.n_heads * dec.head_dim].reshape(rows, dec.n_heads, dec.head_dim)
        k_new = qkv[:, dec.n_heads * dec.head_dim:][:, :dec.n_kv * dec.head_dim].reshape(rows, dec.n_kv, dec.head_dim)
        cos, sin = dec.cos[positions].unsqueeze(1), dec.sin[positions].unsqueeze(1)
        per_layer.append(("RoPE on q and k", lambda: (dec._rotate(q, cos, sin), dec._rotate(k_new, cos, sin))))
        blk = dec.blocks[0]
        slot_rows = torch.arange(rows, device=device)

        def cache_write():
            blk.keys[0][slot_rows, :, positions] = k_new
            blk.values[0][slot_rows, :, positions] = k_new
        per_layer.append(("KV-cache writes (index_put)", cache_write))
        keys, values = blk.keys[0][:, :, :span], blk.values[0][:, :, :span]
        mask = (torch.arange(span, device=device)[None, :] > positions[:, None]).view(rows, 1, 1, span)
        allowed = ~mask
        qg = q.view(rows, dec.n_kv, dec.n_heads // dec.n_kv, dec.head_dim)
        # the decoder's own two attention paths for layer 0, as decode_step calls them with a span
        matmul_attention = lambda: dec._matmul_attention(0, q, [(0, rows, span, mask, blk)])  # noqa: E731
        sdpa_attention = lambda: dec._sdpa_attention(0, q, span, allowed)  # noqa: E731
        per_layer.append(("attention as the decoder does it (matmul, mask, fp32 softmax, matmul)", matmul_attention))
        per_layer.append(("  alternative: SDPA with the same mask (span_attention='sdpa')", sdpa_attention))
        per_layer.append(("  alternative: SDPA without a mask (lower bound)",
                          lambda: F.scaled_dot_product_attention(qg, keys, values)))
        gate_up = torch.randn(rows, 2 * inner_width, device=device, dtype=dtype)
        per_layer.append(("residual adds x2 (torch)", lambda: (x + attn_out[:, :x.shape[1]], x + h)))
        per_layer.append(("SiLU(gate) * up (torch)",
                          lambda: F.silu(gate_up[:, :inner_width]) * gate_up[:, inner_width:]))
        if fused is not None:
            per_layer += [
                ("fused Triton: RoPE + KV write + attention over own positions",
                 lambda: fused.rope_attend(qkv, dec.cos, dec.sin, positions, blk.keys[0], blk.values[0], dec.n_heads,
                                           dec.n_kv, dec.scale)),
                ("fused Triton: add + RMSNorm x2 (replaces the norms and the adds)",
                 lambda: (fused.add_rms_norm(x, h, layer["ln1"], dec.eps),
                          fused.add_rms_norm(x, h, layer["ln2"], dec.eps))),
                ("fused Triton: SiLU(gate) * up", lambda: fused.silu_mul(gate_up)),
            ]
        # the masked SDPA is a drop-in only if it gives the decoder's numbers
        sdpa_diff = (sdpa_attention().float() - matmul_attention().float()).abs().max().item()
        kv_bytes = 2 * keys.numel() * keys.element_size()
        for name, fn in per_layer:
            try:  # one part that fails (e.g. a kernel that does not build) loses its own row only
                results.append((name, ms(fn) * n_layers, f"one layer x {n_layers}"))
            except Exception as err:  # noqa: BLE001
                results.append((f"{name}: FAILED", float("nan"), failure(err)))
        final = dec._rms(x, dec.norm)
        results.append(("output head (logits, fp32)", ms(lambda: dec.logits(final)), "logits"))

        logits = dec.logits(final)
        keys64 = torch.randint(0, 2 ** 62, (rows,), generator=gen).to(device)
        counters = torch.full((rows,), span, dtype=torch.long).to(device)
        results.append(("random numbers per row (counter hash)", ms(lambda: counter_uniforms(keys64, counters)),
                        "outside the graph"))
        u = counter_uniforms(keys64, counters)
        for name, params in (("sampling: greedy (argmax)", SamplingParams(temperature=0)),
                             ("sampling: T 0.7 top-p 0.9 (the benchmark's)",
                              SamplingParams(temperature=0.7, top_p=0.9)),
                             ("sampling: T 1.0, no top-p", SamplingParams(temperature=1.0, top_p=1.0))):
            results.append((name, ms(lambda p=params: sample_tokens(logits, p, u)), "outside the graph"))

    measured = args.measured_step_ms
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {platform.node()}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, shape {args.shape} (random init), {dtype}, {rows} rows, span {span} "
          f"(KV read per layer {kv_bytes / 1e6:.1f} MB), median of {args.repeats} x {args.inner} calls")
    print(f"| part | ms per step | {'share of the measured step | ' if measured else ''}how |")
    print(f"|---|---:|{'---:|' if measured else ''}---|")
    for name, t, how in results:
        share = f" {100 * t / measured:.0f}% |" if measured else ""
        print(f"| {name} | {t:.3f} |{share} {how} |")

    print(f"masked SDPA vs the decoder's attention, one layer: max |diff| {sdpa_diff:.2e} ({dtype})")

    if device.type == "cuda" and not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        try:  # the table above is the result; a profiler that cannot run here (e.g. no CUPTI access) only notes it
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    dec.decode_step(tokens, positions, span)
                    sample_tokens(dec.logits(final), SamplingParams(temperature=0.7, top_p=0.9), u)
                torch.cuda.synchronize()
            print("\nKernels by device time over 3 eager steps + top-p sampling (torch.profiler):")
            averages = prof.key_averages()
            try:  # the sort key's name changed from cuda to device in recent torch
                print(averages.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))
            except (AttributeError, KeyError, ValueError):
                print(averages.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
        except Exception as err:  # noqa: BLE001
            print(f"profiler pass failed: {type(err).__name__}: {str(err)[:200]}")


if __name__ == "__main__":
    main()
