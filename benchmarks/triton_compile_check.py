"""Compile the lean decoder's Triton kernels (selfalign/generation/triton_kernels.py) for a GPU without one: each kernel
at the shapes it will meet (SmolLM2-135M, SmolLM2-1.7B, Qwen2.5-1.5B; bf16 and fp32), printed with its registers,
spilled bytes and shared memory. Run here before a device call: Triton's interpreter, which the tests use, does not
apply the compiler's rules, so a kernel can pass the tests and still fail to build on the GPU.

    python benchmarks/triton_compile_check.py              # sm_90 (H100/H200)
    python benchmarks/triton_compile_check.py --arch 80    # A100

Uses Triton's ahead-of-time entry points (triton.compile on an ASTSource with a GPUTarget), which are internal and may
move between Triton versions; checked with triton 3.9.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are defined: interpreted ones cannot be compiled

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from selfalign.generation import triton_kernels as tk  # noqa: E402

SHAPES = {  # name: hidden, intermediate, heads, KV heads, head_dim
    "smollm2-135m": (576, 1536, 9, 3, 64),
    "smollm2-1.7b": (2048, 8192, 32, 32, 64),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128),
}


def compile_one(fn, signature: dict, constants: dict, aligned: list[str], options: dict, target) -> str:
    sig = dict(signature, **{k: "constexpr" for k in constants})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    try:
        k = triton.compile(ASTSource(fn, sig, constants, attrs=attrs), target=target, options=options)
    except Exception as err:  # noqa: BLE001 - every kernel is tried; the exit status says whether any failed
        return f"FAILED: {type(err).__name__}: {str(err)[:400]}"
    usage = ""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" in k.asm and os.path.exists(tool):
        path = "/tmp/selfalign_triton_check.cubin"
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
        usage = ", ".join(f"{f.split(':')[0].lower()} {f.split(':')[1]}" for f in line.split()
                          if f.startswith(("REG:", "LOCAL:")))  # local: bytes spilled to local memory
    return f"ok, {usage or 'no resource usage'}, dynamic shared {k.metadata.shared} B"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    failed = 0
    for dtype in ("bf16", "fp32"):
        ptr = f"*{dtype}"
        for name, (hidden, inner, heads, kv, head_dim) in SHAPES.items():
            for has_delta in (True, False):
                block = tk._pow2(hidden)
                r = compile_one(tk._add_rms_norm_kernel,
                                {"x_ptr": ptr, "delta_ptr": ptr, "w_ptr": ptr, "sum_ptr": ptr, "out_ptr": ptr,
                                 "n_cols": "i32", "eps": "fp32"}, {"HAS_DELTA": has_delta, "BLOCK": block},
                                ["x_ptr", "delta_ptr", "w_ptr", "sum_ptr", "out_ptr"],
                                {"num_warps": tk.norm_warps(hidden)}, target)
                failed += r.startswith("FAILED")
                print(f"{dtype} {name} add_rms_norm (delta {has_delta}): {r}")
            r = compile_one(tk._silu_mul_kernel, {"gate_up_ptr": ptr, "out_ptr": ptr, "n_cols": "i32"},
                            {"BLOCK": tk.SILU_BLOCK}, ["gate_up_ptr", "out_ptr"], {"num_warps": 4}, target)
            failed += r.startswith("FAILED")
            print(f"{dtype} {name} silu_mul: {r}")
            constants = tk.attention_constants(heads, kv, head_dim, dtype == "fp32")
            r = compile_one(tk._rope_attend_kernel,
                            {"qkv_ptr": ptr, "cos_ptr": ptr, "sin_ptr": ptr, "pos_ptr": "*i64", "k_cache": ptr,
                             "v_cache": ptr, "out_ptr": ptr, "qkv_row_stride": "i32", "slot_stride": "i32",
                             "head_stride": "i32", "scale": "fp32"}, constants,
                            # aligned: Triton specialises integers divisible by 16 at launch, as these are
                            ["qkv_ptr", "cos_ptr", "sin_ptr", "pos_ptr", "k_cache", "v_cache", "out_ptr",
                             "qkv_row_stride", "slot_stride", "head_stride"],
                            dict(tk.ATTENTION_LAUNCH), target)
            failed += r.startswith("FAILED")
            print(f"{dtype} {name} rope_attend {constants}: {r}")
    print(f"{failed} kernel(s) failed to compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
