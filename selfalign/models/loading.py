"""Loading models and tokenizers (safetensors only; `trust_remote_code` off unless asked)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from selfalign.models.registry import PACKAGED_MODELS, resolve_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from selfalign.errors import ConfigError

        raise ConfigError(f"device '{device}' asked for, but this torch sees no CUDA GPU (use auto or cpu)")
    return device


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    """bf16 on GPU, fp32 on CPU unless asked: fp32 is the numerically safe default for CPU training."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if dtype not in dtypes:
        from selfalign.errors import ConfigError

        raise ConfigError(f"unknown dtype '{dtype}' (auto, {', '.join(dtypes)})")
    return dtypes[dtype]


def load_tokenizer(spec: str | None = None, padding_side: str = "left", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if spec and spec not in PACKAGED_MODELS and (Path(spec) / "tokenizer_config.json").is_file():
        folder = Path(spec)  # a tokenizer-only folder (no weights) serves too: a tokenizer needs none
    else:
        folder = resolve_model(spec)
    adapter = folder / "adapter_config.json"
    if adapter.exists() and not (folder / "tokenizer_config.json").exists():
        folder = resolve_model(json.loads(adapter.read_text())["base_model_name_or_path"])
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str | None = None, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               load_on_device: bool = False):
    """A causal LM in eval mode. A LoRA adapter folder is loaded onto its base model. `load_on_device`: a CUDA
    model's weights go from its files straight to the GPU (transformers' device_map), never all in host memory at
    once, for when several processes load a large model at the same moment."""
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    folder = resolve_model(spec)
    adapter = folder / "adapter_config.json"
    if adapter.exists() and not any(folder.glob("model*.safetensors")):
        from peft import PeftModel

        base = load_model(json.loads(adapter.read_text())["base_model_name_or_path"], dtype, device, trust_remote_code,
                          load_on_device)
        model = PeftModel.from_pretrained(base, str(folder))
    else:
        from safetensors import SafetensorError

        try:
            direct = {"device_map": device} if load_on_device and device.startswith("cuda") else {}
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code, **direct)
        except (SafetensorError, OSError) as e:  # a cut-short weight file, a config.json that is not JSON
            if isinstance(e, OSError) and e.errno is not None:  # the system's own (permissions, memory): as it is
                raise
            from selfalign.errors import ModelNotFoundError

            raise ModelNotFoundError(f"{folder}: cannot load this model ({type(e).__name__}: "
                                     f"{(str(e).splitlines() or [''])[0][:200]}); a weight or config file in it is "
                                     f"damaged or incomplete") from None
    model.to(device)
    model.eval()
    model.selfalign_source = str(folder)
    return model


# folder names every run (or trainer) gives its checkpoints: alone they do not say which run's model it is
GENERIC_FOLDER_NAMES = re.compile(r"^(final|model|checkpoint(-\d+)?|step-\d+)$")


def model_name(spec: str | None) -> str:
    """A stable display name for records: the short name, or the folder name, with its parent's for the generic
    names of checkpoint folders (`runs/spa/final` -> "spa/final", not "final")."""
    spec = str(spec or "smollm2-135m")
    if "/" not in spec and not spec.endswith(".gguf"):
        return spec
    path = Path(spec)
    if GENERIC_FOLDER_NAMES.match(path.name) and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name or spec


def module_names(folder: str | os.PathLike) -> set[str]:
    """The names of the modules that hold weights in a model folder ("model.layers.0.self_attn.q_proj", ...), read
    from its safetensors headers (no tensor is loaded); empty for a folder without safetensors."""
    from safetensors import safe_open

    names = set()
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.update(k.rsplit(".", 1)[0] for k in st.keys())
    return names


def umask_permissions(*paths: str | os.PathLike) -> None:
    """Give weight files, or the .safetensors files in weight folders, the permissions the process's umask gives any
    other new file (0644 under the usual 022). safetensors writes through a temporary file created 0600, so a
    trained model would otherwise be unreadable to the rest of a team sharing the run folder, while its config and
    tokenizer beside it are readable."""
    mask = _umask()
    for p in map(Path, paths):
        for f in (sorted(p.glob("*.safetensors")) if p.is_dir() else [p]):
            os.chmod(f, 0o666 & ~mask)


def _umask() -> int:
    """This process's umask, read from /proc on Linux: setting it to read it back (the only portable way) would
    change it for every thread for a moment."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
