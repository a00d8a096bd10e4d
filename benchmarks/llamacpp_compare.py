"""The lean backend's decode loop against llama.cpp's batched decoding, at one fixed shape: B sequences, each with its
own P-token prompt, each decoding T tokens (no end-of-sequence stop, no sampling: both sides feed the argmax or a
fixed token). Issue #8 names llama.cpp on a GGUF export as the other CPU route; this measures it on the same box in
the same run, alternating the two so the VM's drift hits both.

    python benchmarks/llamacpp_compare.py --llama-bench PATH/llama-batched-bench \
        --gguf embedded,/tmp/smollm2-135m-f32.gguf --rows 128 --prompt-tokens 64 --new-tokens 128 --repeats 2

llama.cpp rows come from its own `llama-batched-bench` (prompts not shared, `--output-format jsonl`), once per GGUF
and per KV cache type in --kv-types (f16 is llama.cpp's default; f32 matches the lean cache). The lean row runs
LeanDecoder directly: prefill in chunks of at most PREFILL_TOKENS tokens (as LeanGenerator does), then T decode
steps of all B rows. Generated tokens/s = B*T / (prefill + decode seconds), the issue's metric.

Getting llama-batched-bench and an F32 GGUF (not project dependencies; nothing here installs them):
    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2 --target llama-batched-bench
    pip install sentencepiece  # its converter imports it even for BPE tokenizers
    PYTHONPATH=gguf-py python convert_hf_to_gguf.py "$(selfalign models path smollm2-135m)" --outtype f32 \
        --outfile /tmp/smollm2-135m-f32.gguf
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from selfalign.generation.lean_backend import PREFILL_TOKENS, LeanGenerator  # noqa: E402
from selfalign.models import PACKAGED_MODELS  # noqa: E402


def lean_row(decoder, rows: int, prompt_tokens: int, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for rows x prompt_tokens prompts and new_tokens steps."""
    decoder.allocate(rows, prompt_tokens + new_tokens)
    ids = torch.randint(0, decoder.lm_head.shape[0], (rows, prompt_tokens), generator=torch.Generator().manual_seed(0))
    chunk = max(1, PREFILL_TOKENS // prompt_tokens)
    with torch.inference_mode():
        t0 = time.perf_counter()
        last = []
        for lo in range(0, rows, chunk):
            hidden = decoder.forward_full(ids[lo:lo + chunk], list(range(lo, min(rows, lo + chunk))))
            last.append(hidden[:, -1])
        tokens = decoder.logits(torch.cat(last)).argmax(dim=-1)
        t1 = time.perf_counter()
        for t in range(new_tokens):
            tokens = decoder.decode_step(tokens, torch.full((rows,), prompt_tokens + t)).argmax(dim=-1)
        t2 = time.perf_counter()
    decoder.release()
    return t1 - t0, t2 - t1


def llama_row(bench: str, gguf: str, kv: str, rows: int, prompt_tokens: int, new_tokens: int,
              threads: int) -> tuple[float, float]:
    cmd = [bench, "-m", gguf, "-t", str(threads), "-c", str(rows * (prompt_tokens + new_tokens) + 64), "-b", "2048",
           "-ub", "512", "-ctk", kv, "-ctv", kv, "-npp", str(prompt_tokens), "-ntg", str(new_tokens),
           "-npl", str(rows), "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    [rec] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rec["t_pp"], rec["t_tg"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True, help="path to llama.cpp's llama-batched-bench")
    ap.add_argument("--gguf", default="embedded", help="comma list of GGUF files; 'embedded' = smollm2-135m's Q4_1")
    ap.add_argument("--kv-types", default="f16,f32", help="llama.cpp KV cache types to run")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    ggufs = [str(PACKAGED_MODELS["smollm2-135m"].gguf_path()) if g == "embedded" else g for g in args.gguf.split(",")]
    decoder = LeanGenerator("smollm2-135m", batch_size=args.rows, dtype="float32", device="cpu").decoder
    shape = (args.rows, args.prompt_tokens, args.new_tokens)
    lean_row(decoder, args.rows, args.prompt_tokens, 2)  # warm-up (llama-batched-bench warms up too)
    results = []  # (repeat, name, prefill s, decode s)
    for r in range(1, args.repeats + 1):
        pp, tg = lean_row(decoder, *shape)
        results.append((r, "selfalign lean (fp32 weights, fp32 KV cache)", pp, tg))
        print(f"repeat {r}: lean {pp:.1f} + {tg:.1f} s", flush=True)
        for gguf in ggufs:
            for kv in args.kv_types.split(","):
                pp, tg = llama_row(args.llama_bench, gguf, kv, *shape, threads)
                results.append((r, f"llama.cpp {Path(gguf).name} ({kv} KV cache)", pp, tg))
                print(f"repeat {r}: llama.cpp {Path(gguf).name} {kv}: {pp:.1f} + {tg:.1f} s", flush=True)
    lean = {r: pp + tg for r, name, pp, tg in results if name.startswith("selfalign")}
    b, p, t = shape
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPUs, {threads} threads, torch {torch.__version__}; {b} rows x {p} prompt tokens, "
          f"{t} new tokens each")
    print("| repeat | method | prefill s | prefill tok/s | decode s | decode tok/s | generated tok/s | vs lean |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r, name, pp, tg in results:
        print(f"| {r} | {name} | {pp:.1f} | {b * p / pp:.0f} | {tg:.1f} | {b * t / tg:.1f} | "
              f"{b * t / (pp + tg):.1f} | {lean[r] / (pp + tg):.2f}x |")


if __name__ == "__main__":
    main()
