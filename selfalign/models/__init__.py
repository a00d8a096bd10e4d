"""Models: resolve a spec to a local safetensors folder, load it, format chats."""

from selfalign.models.chat import encode_prompt, encode_prompt_response, render_prompt
from selfalign.models.loading import (load_model, load_tokenizer, model_name, module_names, pick_device, pick_dtype,
                                      umask_permissions)
from selfalign.models.registry import DEFAULT_MODEL, PACKAGED_MODELS, list_models, resolve_model

__all__ = ["DEFAULT_MODEL", "PACKAGED_MODELS", "encode_prompt", "encode_prompt_response", "list_models", "load_model",
           "load_tokenizer", "model_name", "module_names", "pick_device", "pick_dtype", "render_prompt",
           "resolve_model", "umask_permissions"]
