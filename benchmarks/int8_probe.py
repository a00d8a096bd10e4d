"""Would int8 matmuls make the lean CPU decoder faster without hurting answers? A probe, not a backend.

    python benchmarks/int8_probe.py                  # embedded SmolLM2-135M, 4 real prompts, 1 torch thread

torch's fbgemm kernels (`quantized::linear_dynamic`, per-channel int8 weights, activations quantised per call with
one scale per tensor, 7-bit range because AVX2 without VNNI saturates at 8) replace the lean decoder's F.linear for
chosen weight groups. Two measurements:

  speed    one 64-row decode step at mixed positions (100..500), fp32 vs all-int8, alternated 3 times
  quality  teacher-forced over the rendered prompts: top-1 agreement with the fp32 next token and KL(fp32 || int8)
           of the next-token distributions, quantising each weight group alone and in combination

Result and decision: benchmarks/RESULTS.md, "Fast generation" (int8 probe).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from selfalign.data.loaders import load_prompts, shared_data_dir  # noqa: E402
from selfalign.generation.lean_decoder import LeanDecoder  # noqa: E402
from selfalign.models import load_model, load_tokenizer, render_prompt  # noqa: E402

GROUPS = ("wqkv", "wo", "w13", "w2", "head")


def pack(weight: torch.Tensor):
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
    q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


class ProbeDecoder(LeanDecoder):
    """The lean decoder with F.linear swapped for fbgemm's int8 matmul on the weights in `packed`."""

    def __init__(self, model):
        super().__init__(model)
        self.all_packed = {}
        for layer in self.layers:
            for name in ("wqkv", "wo", "w13", "w2"):
                self.all_packed[id(layer[name])] = (name, pack(layer[name]))
        self.all_packed[id(self.lm_head)] = ("head", pack(self.lm_head))
        self.use(())

    def use(self, groups) -> None:
        self.packed = {k: p for k, (name, p) in self.all_packed.items() if name in groups}

    def _linear(self, x, weight, bias=None):
        p = self.packed.get(id(weight))
        if p is None:
            return F.linear(x, weight, bias)
        out = torch.ops.quantized.linear_dynamic(x.contiguous(), p, True)
        return out if bias is None else out + bias

    def _qkv(self, layer, h):
        qkv = self._linear(h, layer["wqkv"], layer["bqkv"])
        nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        return qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]

    def _mlp_out(self, layer, x, attn):
        x = x + self._linear(attn, layer["wo"], layer["bo"])
        gate, up = self._linear(self._rms(x, layer["ln2"]), layer["w13"]).chunk(2, dim=-1)
        return x + self._linear(F.silu(gate) * up, layer["w2"])

    def logits(self, hidden):
        return self._linear(hidden, self.lm_head).float()


def main() -> None:
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
    model = load_model("smollm2-135m", dtype="float32", device="cpu")
    tok = load_tokenizer("smollm2-135m")
    dec = ProbeDecoder(model)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), SmolLM2-135M-Instruct fp32")

    b = 64
    tokens, positions = torch.randint(0, 49000, (b,)), torch.linspace(500, 100, b).long()
    dec.allocate(b, 600)
    times = {"fp32": [], "int8 (all)": []}
    with torch.inference_mode():
        for _ in range(3):
            for name, groups in (("fp32", ()), ("int8 (all)", GROUPS)):
                dec.use(groups)
                dec.decode_step(tokens, positions)
                t = time.perf_counter()
                for _ in range(3):
                    dec.decode_step(tokens, positions)
                times[name].append((time.perf_counter() - t) / 3)
    print("| decode step, 64 rows | best of 3 (s) | all (s) |\n|---|---:|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")

    prompts = load_prompts(shared_data_dir() / "prompts" / "unlabelled_pool.jsonl", limit=4)
    seqs = [tok(render_prompt(tok, p.messages), add_special_tokens=False)["input_ids"] for p in prompts]
    with torch.inference_mode():
        dec.use(())
        ref = [torch.log_softmax(dec.logits(dec.forward_full(torch.tensor([s])))[0], -1) for s in seqs]
        print(f"\n| int8 weight groups ({sum(map(len, seqs))} teacher-forced positions) | top-1 = fp32 | "
              "KL(fp32 || int8) |\n|---|---:|---:|")
        for groups in [(g,) for g in GROUPS] + [("wqkv", "w13"), ("wqkv", "w13", "wo"), GROUPS]:
            dec.use(groups)
            agree, kl = [], []
            for s, r in zip(seqs, ref):
                g = torch.log_softmax(dec.logits(dec.forward_full(torch.tensor([s])))[0], -1)
                agree.append((g.argmax(-1) == r.argmax(-1)).float().mean().item())
                kl.append(F.kl_div(g, r, log_target=True, reduction="batchmean").item())
            print(f"| {' + '.join(groups)} | {sum(agree) / len(agree):.3f} | {sum(kl) / len(kl):.4f} |")


if __name__ == "__main__":
    main()
