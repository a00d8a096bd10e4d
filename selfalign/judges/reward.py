"""A Bradley-Terry reward model trained by selfalign, used as a judge (each answer scored once).

Model: the embedded SmolLM2-135M-Instruct backbone, its top `train_layers` decoder layers and final norm
fine-tuned, plus a scalar head on the hidden state of the sequence's last token (the end-of-turn token of the
rendered chat prompt + answer). Loss: Bradley-Terry, -log sigmoid(r(chosen) - r(rejected)).

Why not TRL's RewardTrainer (or AutoModelForSequenceClassification): on this 2-core CPU a backward pass through
all 30 layers costs ~2-3 forward passes per step, so full or LoRA training over a few hundred pairs takes hours.
Freezing the bottom layers makes their output a fixed function of the input, so it is computed ONCE per sequence
(one forward pass, stopped at the first trained layer) and cached; every epoch then runs forward + backward
through only the top layers (2 of 30 by default), about 1/5 of a full forward. That needs a custom loop (TRL runs
the whole model every step), and the loop is ~40 lines. The classification model's last-token pooling is also
avoided: it looks for the last non-pad token, and this tokenizer's pad token is its end-of-turn token.

Training data: real preference pairs (default: a seeded sample of `preferences/ultrafeedback_binarized_train_1k`,
whose prompts do not overlap AlpacaEval or MT-Bench; rows with chosen == rejected dropped; any pair whose prompt
matches an AlpacaEval or MT-Bench instruction is dropped again here as a guard). Held-out accuracy is measured on
`ultrafeedback_binarized_eval_200`. Saved as `reward.safetensors` (trained layers, norm, head) +
`reward_config.json` (base model and its sha256, data files and ids hash, hyperparameters, metrics).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import time
from pathlib import Path

from tqdm.auto import tqdm

from selfalign.errors import SelfalignError
from selfalign.judges.base import PairwiseItem, PairwiseJudge, PairwiseVerdict
from selfalign.judges.prompts import truncate_tokens

CONFIG_FILE = "reward_config.json"
WEIGHTS_FILE = "reward.safetensors"


# ------------------------------------------------------------------------------------------------ encoding
def encode_for_reward(tokenizer, messages: list[dict], answer: str, max_length: int = 384,
                      max_prompt_tokens: int = 128) -> list[int]:
    """Token ids of the chat (messages + answer) rendered by the model's own template, at most `max_length`
    tokens: the last user turn is cut to `max_prompt_tokens` and the answer to what is left, as text, so the
    template's turn markers always survive (a cut answer simply lacks its ending)."""
    from selfalign.models import encode_prompt_response

    msgs = [dict(m) for m in messages]
    msgs[-1]["content"], _ = truncate_tokens(tokenizer, msgs[-1]["content"], max_prompt_tokens)
    msgs[-1]["content"] = msgs[-1]["content"].replace("\n[... truncated ...]", "")
    from selfalign.models import encode_prompt

    room = max(16, max_length - len(encode_prompt(tokenizer, msgs)) - 4)
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) > room:
        answer = tokenizer.decode(ids[:room], skip_special_tokens=True)
    full, _ = encode_prompt_response(tokenizer, msgs, answer)
    return full[:max_length]


def min_reward_length(tokenizer, max_prompt_tokens: int) -> int:
    """The smallest `max_length` that keeps 16 answer tokens after a prompt cut to `max_prompt_tokens` (the answer
    and the end-of-turn token the reward is read from would otherwise be cut away)."""
    from selfalign.models import encode_prompt

    template = len(encode_prompt(tokenizer, [{"role": "user", "content": ""}]))
    return max_prompt_tokens + template + 4 + 16


def _pad_left(seqs, pad_id):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.as_tensor(s)
        mask[row, width - len(s):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class _Stop(Exception):
    pass


def _bottom_states(backbone, seqs: list[list[int]], first_trained: int, pad_id: int, batch_size: int = 8,
                   progress: bool = False) -> list:
    """The input of layer `first_trained` (the output of the frozen layers) for each sequence, unpadded; the
    forward pass stops there. first_trained == n_layers means the final (normed) hidden states."""
    import torch

    captured = {}
    n_layers = len(backbone.layers)

    def hook(module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop

    handle = backbone.layers[first_trained].register_forward_pre_hook(hook, with_kwargs=True) \
        if first_trained < n_layers else None
    out: list = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    bar = tqdm(total=len(seqs), desc="reward features", unit="seq", disable=not progress)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask, pos = _pad_left([seqs[i] for i in idx], pad_id)
            with torch.inference_mode():
                try:
                    h = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
                except _Stop:
                    h = captured.pop("h")
            for row, i in enumerate(idx):
                out[i] = h[row, ids.shape[1] - len(seqs[i]):].float().clone()
            bar.update(len(idx))
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    return out


class _Top:
    """The trained part: top layers + final norm (run through a k-layer copy of the backbone class, so masks and
    rotary embeddings are the model's own) and a scalar head on the last token."""

    def __init__(self, backbone, k: int, head):
        import copy

        self.k = k
        self.head = head
        if k > 0:
            config = copy.deepcopy(backbone.config)
            config.num_hidden_layers = k
            if getattr(config, "layer_types", None):
                config.layer_types = list(config.layer_types)[-k:]
            config.vocab_size = 1  # the copy never embeds tokens: keep its unused embedding tiny
            config.pad_token_id = None
            self.model = type(backbone)(config)
            self.model.layers = backbone.layers[-k:]
            self.model.norm = backbone.norm
            self.model.rotary_emb = backbone.rotary_emb
            self.model.to(next(backbone.parameters()).dtype)
        else:
            self.model = None
            self.norm = backbone.norm

    def parameters(self):
        params = list(self.head.parameters())
        if self.model is not None:
            params += [p for layer in self.model.layers for p in layer.parameters()]
            params += list(self.model.norm.parameters())
        return params

    def __call__(self, states: list):
        import torch

        width = max(s.shape[0] for s in states)
        dim = states[0].shape[1]
        h = torch.zeros(len(states), width, dim, dtype=states[0].dtype)
        mask = torch.zeros(len(states), width, dtype=torch.long)
        for row, s in enumerate(states):
            h[row, width - s.shape[0]:] = s
            mask[row, width - s.shape[0]:] = 1
        if self.model is not None:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            h = self.model(inputs_embeds=h, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        return self.head(h[:, -1]).squeeze(-1)


# ------------------------------------------------------------------------------------------------ training
def _norm_text(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def evaluation_instructions() -> set[str]:
    """Normalised AlpacaEval and MT-Bench instructions (from the shared data folder, if present): a pair whose
    prompt is one of them is never trained on."""
    from selfalign.data.loaders import shared_data_dir

    d = shared_data_dir()
    out: set[str] = set()
    for rel, keys in (("alpaca_eval/eval_set.jsonl", ("instruction",)), ("mt_bench/question.jsonl", ("turns",))):
        path = d / rel
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                for k in keys:
                    values = row.get(k)
                    for v in values if isinstance(values, list) else [values]:
                        if isinstance(v, str):
                            out.add(_norm_text(v))
    return out


def _pairs(path, n: int | None, seed: int, exclude: set[str]):
    from selfalign.data.loaders import load_preference_pairs

    pairs = [p for p in load_preference_pairs(path) if _norm_text(p.prompt) not in exclude]
    random.Random(seed).shuffle(pairs)
    return pairs[:n] if n else pairs


def _messages(pair) -> list[dict]:
    return list(getattr(pair, "history", None) or []) + [{"role": "user", "content": pair.prompt}]


def train_reward_model(out: str | Path, base: str = "smollm2-135m", train_data: str | Path | None = None,
                       eval_data: str | Path | None = None, n_pairs: int = 300, n_eval: int = 100,
                       max_length: int = 384, max_prompt_tokens: int = 128, train_layers: int = 2, epochs: int = 4,
                       batch_size: int = 16, lr: float = 5e-5, head_lr: float = 1e-3, seed: int = 0,
                       allow_eval_instructions: bool = False, progress: bool = True) -> dict:
    """Train and save a reward model in `out`; returns the metrics written to its config.

    `n_pairs` of 0 or None takes every pair; `n_eval` None takes every held-out pair, 0 none.
    `allow_eval_instructions` lifts the guard against AlpacaEval / MT-Bench prompts, for training on GPT-4's own
    AlpacaEval annotations (then hold out by instruction: `train_crossfit_reward_models`). Held-out pairs never
    share a prompt with training pairs either way."""
    from selfalign.data.loaders import shared_data_dir

    t_start = time.time()
    prefs = shared_data_dir() / "preferences"
    train_data = Path(train_data or prefs / "ultrafeedback_binarized_train_1k.jsonl")
    if eval_data is not None and not Path(eval_data).exists():  # asked for: never silently skipped
        raise SelfalignError(f"{eval_data}: no such file (--eval-pairs)")
    eval_data = Path(eval_data) if eval_data else prefs / "ultrafeedback_binarized_eval_200.jsonl"
    exclude = set() if allow_eval_instructions else evaluation_instructions()
    train = _pairs(train_data, n_pairs, seed, exclude)
    held = _pairs(eval_data, n_eval, seed, exclude) if eval_data.exists() and n_eval != 0 else []
    train_prompts = {_norm_text(p.prompt) for p in train}
    held = [p for p in held if _norm_text(p.prompt) not in train_prompts]
    if len(train) < 2:
        left_out = len(_pairs(train_data, None, seed, set())) - len(_pairs(train_data, None, seed, exclude))
        why = (f"; {left_out} were left out because their prompt is an AlpacaEval / MT-Bench instruction: pass "
               "--allow-eval-instructions to train on them (then hold out by instruction when you measure "
               "agreement)" if left_out else "")
        raise SelfalignError(f"{train_data}: fewer than 2 usable preference pairs{why}")

    trainer = _RewardTrainer(base, train_layers, max_length, max_prompt_tokens, seed)
    t0 = time.time()
    feats = trainer.features(train, progress)
    held_feats = trainer.features(held, progress) if held else []
    feature_seconds = time.time() - t0
    hyper = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "head_lr": head_lr}
    history, train_seconds = trainer.fit(feats, held_feats, **hyper, progress=progress)
    config = trainer.save(out, train, train_data, held, eval_data, hyper, history,
                          {"features": round(feature_seconds, 1), "training": round(train_seconds, 1),
                           "total": round(time.time() - t_start, 1)},
                          allow_eval_instructions=allow_eval_instructions)
    return config


class _RewardTrainer:
    """The shared steps of training a reward model: the frozen backbone, features of the frozen layers, fitting
    the top layers + head, saving. Fitting starts from the backbone's original top layers and from the same random
    state every time, so several models (one per cross-fitting fold) can be fitted on one set of features."""

    def __init__(self, base: str, train_layers: int, max_length: int, max_prompt_tokens: int, seed: int):
        import torch

        from selfalign.models import load_model, load_tokenizer

        self.base, self.seed = base, seed
        self.max_length, self.max_prompt_tokens = max_length, max_prompt_tokens
        torch.manual_seed(seed)
        self.tok = load_tokenizer(base, padding_side="left")
        need = min_reward_length(self.tok, max_prompt_tokens)
        if max_length < need:  # else a long prompt fills every token: chosen and rejected encode the same
            raise SelfalignError(f"--max-length {max_length} leaves no room for the answer: a prompt takes up to "
                                 f"{max_prompt_tokens} tokens plus {base}'s chat template, so give at least {need}")
        self.backbone = load_model(base, dtype="float32", device="cpu").model
        self.n_layers = len(self.backbone.layers)
        if not 0 <= train_layers <= self.n_layers:
            raise SelfalignError(f"--train-layers must be between 0 and {self.n_layers} ({base} has {self.n_layers} "
                                 f"layers), not {train_layers}")
        self.k = int(train_layers)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self._initial_top = {n: t.detach().clone() for n, t in self._top_state().items()}
        self._rng_state = torch.get_rng_state()

    def _top_state(self) -> dict:
        """The trained part of the backbone by its saved name: layers.<i>.* (top layers), norm.* (when k > 0)."""
        state = {}
        for i, layer in enumerate(self.backbone.layers[self.n_layers - self.k:]):
            state.update({f"layers.{i}.{n}": p for n, p in layer.named_parameters()})
        if self.k:
            state.update({f"norm.{n}": p for n, p in self.backbone.norm.named_parameters()})
        return state

    def encode(self, pairs) -> list[list[int]]:
        return [encode_for_reward(self.tok, _messages(p), ans, self.max_length, self.max_prompt_tokens)
                for p in pairs for ans in (p.chosen, p.rejected)]

    def features(self, pairs, progress: bool = False) -> list:
        """Frozen-layer outputs, two per pair (chosen, rejected)."""
        return _bottom_states(self.backbone, self.encode(pairs), self.n_layers - self.k, self.tok.pad_token_id,
                              progress=progress)

    def fit(self, feats, held_feats, epochs: int, batch_size: int, lr: float, head_lr: float,
            progress: bool = False) -> tuple[list[dict], float]:
        """Bradley-Terry training of the top layers + a fresh head on `feats`; held-out accuracy per epoch."""
        import torch

        with torch.no_grad():
            for n, p in self._top_state().items():
                p.copy_(self._initial_top[n])
        torch.set_rng_state(self._rng_state)
        hidden = self.backbone.config.hidden_size
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden))
        torch.nn.init.zeros_(head.bias)
        top = _Top(self.backbone, self.k, head)
        layer_params = [p for p in top.parameters() if p not in set(head.parameters())]
        for p in top.parameters():
            p.requires_grad_(True)
        groups = [{"params": list(head.parameters()), "lr": head_lr}]
        if layer_params:
            groups.append({"params": layer_params, "lr": lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)

        def accuracy(states) -> tuple[float | None, float | None]:
            if not states:
                return None, None
            with torch.no_grad():
                r = torch.cat([top(states[i:i + 32]) for i in range(0, len(states), 32)])
            margin = r[0::2] - r[1::2]
            return float((margin > 0).float().mean()), float(torch.nn.functional.logsigmoid(margin).mean().neg())

        history = []
        rng = random.Random(self.seed)
        n_train = len(feats) // 2
        t0 = time.time()
        for epoch in range(epochs):
            order = list(range(n_train))
            rng.shuffle(order)
            losses = []
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                states = [feats[2 * i + j] for i in idx for j in (0, 1)]
                r = top(states)
                loss = -torch.nn.functional.logsigmoid(r[0::2] - r[1::2]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            train_acc, _ = accuracy(feats)
            held_acc, held_loss = accuracy(held_feats)
            history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "train_accuracy": train_acc,
                            "heldout_accuracy": held_acc, "heldout_loss": held_loss})
            if progress:
                print(json.dumps(history[-1]), flush=True)
        for p in top.parameters():
            p.requires_grad_(False)
        self.head = head
        return history, time.time() - t0

    def save(self, out, train, train_data, held, eval_data, hyper: dict, history: list, seconds: dict,
             **extra) -> dict:
        """Write the last fitted model (safetensors + config) to `out`; returns the config."""
        from safetensors.torch import save_file

        from selfalign.models import resolve_model
        from selfalign.runs import model_fingerprint

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"head.{n}": p.detach().contiguous() for n, p in self.head.named_parameters()}
        tensors.update({n: p.detach().contiguous() for n, p in self._top_state().items()})
        # both files are written aside and renamed into place (weights, then config): a kill leaves the old model
        # whole, or the new weights without a config (the judge then says so), never a torn file or a mix
        save_file(tensors, str(out / f"{WEIGHTS_FILE}.tmp"))
        from selfalign.models import umask_permissions

        umask_permissions(out / f"{WEIGHTS_FILE}.tmp")
        ids_hash = hashlib.sha256("\n".join(p.id for p in train).encode()).hexdigest()[:16]
        config = {
            "kind": "selfalign-bradley-terry-reward-model",
            "base_model": self.base,
            "base_model_folder": str(resolve_model(self.base)),
            "base_model_sha256": model_fingerprint(resolve_model(self.base)),
            "train_layers": self.k, "n_layers": self.n_layers, "max_length": self.max_length,
            "max_prompt_tokens": self.max_prompt_tokens,
            "pooling": "last token (end of the assistant turn)", "loss": "bradley-terry",
            "train_data": {"file": str(train_data), "n_pairs": len(train), "ids_sha256_16": ids_hash,
                           "seed": self.seed, "ids": [p.id for p in train]},
            "eval_data": {"file": str(eval_data), "n_pairs": len(held)},
            **extra,
            "hyperparameters": {**hyper, "optimizer": "AdamW", "dtype": "float32"},
            "history": history,
            "seconds": seconds,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (out / f"{CONFIG_FILE}.tmp").write_text(json.dumps(config, indent=2))
        (out / CONFIG_FILE).unlink(missing_ok=True)  # so a kill between the renames is "config missing", never a mix
        os.replace(out / f"{WEIGHTS_FILE}.tmp", out / WEIGHTS_FILE)
        os.replace(out / f"{CONFIG_FILE}.tmp", out / CONFIG_FILE)
        return config


# ------------------------------------------------------------------------------------------------ judge
def default_reward_dir() -> Path:
    from selfalign.models.registry import cache_dir

    return cache_dir() / "reward" / "smollm2-135m-uf"


class RewardJudge(PairwiseJudge):
    """p_a = sigmoid(r(A) - r(B)) from a reward model trained by `train_reward_model`. Each distinct
    (conversation, answer) is scored once per call, so order cannot matter: every verdict is position-consistent."""

    name = "reward"

    def __init__(self, model: str | Path | None = None, batch_size: int = 8, device: str = "cpu"):
        self.path = Path(model) if model else default_reward_dir()
        cfg_path = self.path / CONFIG_FILE
        if not cfg_path.exists():
            raise SelfalignError(f"{self.path}: no trained reward model ({CONFIG_FILE} missing); train one with "
                                 f"`selfalign judges train-reward --out {self.path}`")
        try:
            self.cfg = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise SelfalignError(f"{cfg_path}: not a readable reward-model config ({e}); retrain it") from None
        missing = [k for k in ("base_model", "max_length", "max_prompt_tokens", "train_layers")
                   if not isinstance(self.cfg, dict) or k not in self.cfg]
        if missing or not (self.path / WEIGHTS_FILE).is_file():
            what = f"its config lacks {', '.join(missing)}" if missing else f"{WEIGHTS_FILE} is missing"
            raise SelfalignError(f"{self.path}: an incomplete reward model ({what}); retrain it with `selfalign "
                                 f"judges train-reward --out {self.path}`")
        self.batch_size = max(1, int(batch_size))
        self.device = device
        self._backbone = self._head = self._tok = None
        self.scored = 0

    def config(self) -> dict:
        from selfalign.runs import file_sha256

        return {"weights_sha256": file_sha256(self.path / WEIGHTS_FILE)[:16], "base": self.cfg["base_model"],
                "max_length": self.cfg["max_length"], "max_prompt_tokens": self.cfg["max_prompt_tokens"]}

    def _load(self):
        if self._backbone is None:
            import torch
            from safetensors.torch import load_file

            from selfalign.models import load_model, load_tokenizer

            base = self.cfg["base_model"]
            folder = self.cfg.get("base_model_folder")
            spec = base if base else folder
            lm = load_model(spec, dtype="float32", device=self.device)
            self._tok = load_tokenizer(spec, padding_side="left")
            backbone = lm.model
            try:
                weights = load_file(str(self.path / WEIGHTS_FILE))
            except Exception as e:  # safetensors' own error types (a truncated or foreign file)
                raise SelfalignError(f"{self.path / WEIGHTS_FILE}: not readable safetensors weights "
                                     f"({str(e).splitlines()[0][:120]}); retrain the reward model") from None
            n, k = len(backbone.layers), int(self.cfg["train_layers"])
            for i, layer in enumerate(backbone.layers[n - k:]):
                layer.load_state_dict({key.split(".", 2)[2]: v for key, v in weights.items()
                                       if key.startswith(f"layers.{i}.")})
            if k:
                backbone.norm.load_state_dict({key[5:]: v for key, v in weights.items() if key.startswith("norm.")})
            head = torch.nn.Linear(backbone.config.hidden_size, 1)
            head.load_state_dict({key[5:]: v for key, v in weights.items() if key.startswith("head.")})
            self._backbone, self._head = backbone.eval(), head.eval()
        return self._backbone, self._head, self._tok

    def score(self, messages_list: list[list[dict]], answers: list[str]) -> list[float]:
        """The reward of each (conversation, answer)."""
        import torch

        backbone, head, tok = self._load()
        seqs = [encode_for_reward(tok, m, a, self.cfg["max_length"], self.cfg["max_prompt_tokens"])
                for m, a in zip(messages_list, answers)]
        out: list[float] = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask, pos = _pad_left([seqs[i] for i in idx], tok.pad_token_id)
            with torch.inference_mode():
                h = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
                r = head(h[:, -1]).squeeze(-1)
            for row, i in enumerate(idx):
                out[i] = float(r[row])
        self.scored += len(seqs)
        return out

    def compare(self, items: list[PairwiseItem], progress: bool = False) -> list[PairwiseVerdict]:
        keys: dict[str, int] = {}
        msgs, answers = [], []
        refs = []
        for it in items:
            pair = []
            for ans in (it.answer_a, it.answer_b):
                key = json.dumps([it.messages, ans], sort_keys=True)
                if key not in keys:
                    keys[key] = len(answers)
                    msgs.append(it.messages)
                    answers.append(ans)
                pair.append(keys[key])
            refs.append(pair)
        rewards = self.score(msgs, answers) if answers else []
        verdicts = []
        for a, b in refs:
            margin = rewards[a] - rewards[b]
            p_a = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, margin))))
            verdicts.append(PairwiseVerdict(p_a=p_a, consistent=True,
                                            details={"reward_a": rewards[a], "reward_b": rewards[b]}))
        return verdicts


# ------------------------------------------------------------------------------------------------ cross-fitted judge
def instruction_fold(instruction: str, folds: int) -> int:
    """The fold of an instruction: sha256 of its normalised text, mod `folds` (every answer pair of one instruction
    lands in the same fold)."""
    return int(hashlib.sha256(_norm_text(instruction).encode("utf-8")).hexdigest(), 16) % folds


def default_crossfit_dir() -> Path:
    from selfalign.models.registry import cache_dir

    return cache_dir() / "reward" / "alpaca-gpt4-crossfit"


def default_crossfit_pairs() -> Path:
    from selfalign.data.loaders import shared_data_dir

    return shared_data_dir() / "alpaca_eval" / "balanced_pairs_dev.json"


SUMMARY_FILE = "crossfit.json"


def train_crossfit_reward_models(out: str | Path | None = None, pairs: str | Path | None = None, folds: int = 2,
                                 base: str = "smollm2-135m", max_length: int = 384, max_prompt_tokens: int = 128,
                                 train_layers: int = 2, epochs: int = 4, batch_size: int = 16, lr: float = 5e-5,
                                 head_lr: float = 1e-3, seed: int = 0, progress: bool = True) -> dict:
    """Train the `reward-crossfit` judge: split GPT-4-annotated pairs (default: the balanced AlpacaEval pairs) into
    `folds` groups by instruction, and for each fold k train a reward model on the other folds into `out`/fold<k>/,
    its held-out accuracy on fold k being its agreement with GPT-4 there. Returns the summary also written to
    `out`/crossfit.json (per-fold and pooled held-out agreement).

    The frozen layers' features are computed once for all pairs and shared by the folds (the per-fold cost is only
    the top-layer training). A finished fold is never retrained, so a killed run resumes at the next fold."""
    from selfalign.data.loaders import load_preference_pairs

    if folds < 2:
        raise SelfalignError(f"--folds must be at least 2, got {folds}")
    out = Path(out) if out else default_crossfit_dir()
    pairs_file = Path(pairs) if pairs else default_crossfit_pairs()
    if not pairs_file.exists():
        raise SelfalignError(f"{pairs_file}: no such file (GPT-4-annotated pairs in alpaca_eval's format)")
    t_start = time.time()
    everything = load_preference_pairs(pairs_file)
    fold_of = [instruction_fold(p.prompt, folds) for p in everything]
    # the same order train_reward_model would give each fold's files: file order, then one seeded shuffle
    splits = []
    for k in range(folds):
        held = [p for p, f in zip(everything, fold_of) if f == k]
        train = [p for p, f in zip(everything, fold_of) if f != k]
        random.Random(seed).shuffle(held)
        random.Random(seed).shuffle(train)
        if len(train) < 2 or not held:
            raise SelfalignError(f"{pairs_file}: fold {k} of {folds} has {len(train)} training and {len(held)} "
                                 "held-out pairs; use fewer folds or more pairs")
        splits.append((train, held))

    hyper = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "head_lr": head_lr}
    from selfalign.runs import file_sha256

    pairs_sha = file_sha256(pairs_file)
    want = {"pairs_sha256": pairs_sha, "folds": folds, "base": base, "max_length": max_length,
            "max_prompt_tokens": max_prompt_tokens, "train_layers": train_layers, "seed": seed, **hyper}
    # a finished fold is kept only if this command would make it: every fold folder, by name (one beyond this
    # command's count differs in `folds`)
    for folder in sorted(out.glob("fold*")) if out.is_dir() else []:
        k = int(folder.name[4:]) if folder.name[4:].isdigit() else None
        train_ids = [p.id for p in splits[k][0]] if k is not None and k < folds else None
        _check_fold_settings(folder, want, pairs_file, train_ids)
    pending = [k for k in range(folds) if not (out / f"fold{k}" / CONFIG_FILE).exists()]
    if pending:
        trainer = _RewardTrainer(base, train_layers, max_length, max_prompt_tokens, seed)
        t0 = time.time()
        index = {p.id: i for i, p in enumerate(everything)}
        if len(index) != len(everything):
            raise SelfalignError(f"{pairs_file}: pair ids are not unique")
        feats = trainer.features(everything, progress)
        feature_seconds = time.time() - t0

        def states(subset):
            return [feats[2 * index[p.id] + j] for p in subset for j in (0, 1)]

        for k in pending:
            train, held = splits[k]
            if progress:
                print(f"fold {k}: training on {len(train)} pairs, held out {len(held)}", flush=True)
            history, train_seconds = trainer.fit(states(train), states(held), **hyper, progress=progress)
            trainer.save(out / f"fold{k}", train, pairs_file, held, pairs_file, hyper, history,
                         {"features (all folds)": round(feature_seconds, 1), "training": round(train_seconds, 1),
                          "total": round(time.time() - t_start, 1)},
                         allow_eval_instructions=True,
                         crossfit={"fold": k, "folds": folds, "pairs_file": str(pairs_file),
                                   "pairs_sha256": pairs_sha,
                                   "split": "sha256 of the normalised instruction mod folds"})
    rows, hits = [], 0.0
    for k in range(folds):
        cfg = _read_fold_config(out / f"fold{k}")
        last, n = cfg["history"][-1], cfg["eval_data"]["n_pairs"]
        rows.append({"fold": k, "train_pairs": cfg["train_data"]["n_pairs"], "heldout_pairs": n,
                     "agreement": last["heldout_accuracy"], "train_accuracy": last["train_accuracy"],
                     "seconds": cfg["seconds"]})
        hits += last["heldout_accuracy"] * n
    n_all = sum(r["heldout_pairs"] for r in rows)
    pooled = hits / n_all
    summary = {"pairs_file": str(pairs_file), "folds": rows, "pooled_agreement": pooled,
               "pooled_standard_error": math.sqrt(pooled * (1 - pooled) / n_all), "n": n_all,
               "seconds": round(time.time() - t_start, 1)}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _read_fold_config(folder: Path) -> dict:
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as e:  # a fold killed while an older version wrote its config
        raise SelfalignError(f"{folder / CONFIG_FILE}: not readable ({e}); remove {folder} to train that fold "
                             "again") from None


def _check_fold_settings(folder: Path, want: dict, pairs_file: Path, train_ids: list[str] | None) -> None:
    """Refuse a finished fold trained otherwise than `want` (other pairs, folds or hyperparameters): kept as it is,
    it would judge instructions it trained on, or mix two trainings in one judge. `train_ids`: the pair ids this
    command would train the fold on (None for a fold it would not make)."""
    if not (folder / CONFIG_FILE).exists():
        return
    cfg = _read_fold_config(folder)
    cross, hp = cfg.get("crossfit") or {}, cfg.get("hyperparameters") or {}
    have = {"folds": cross.get("folds"), "base": cfg.get("base_model"), "max_length": cfg.get("max_length"),
            "max_prompt_tokens": cfg.get("max_prompt_tokens"), "train_layers": cfg.get("train_layers"),
            "seed": (cfg.get("train_data") or {}).get("seed"), **{h: hp.get(h) for h in ("epochs", "batch_size", "lr",
                                                                                          "head_lr")}}
    if "pairs_sha256" in cross:
        have["pairs_sha256"] = cross["pairs_sha256"]
    else:  # written before the digest was recorded: the pairs it trained on stand in for it
        same = train_ids is not None and (cfg.get("train_data") or {}).get("ids") == train_ids
        have["pairs_sha256"] = want["pairs_sha256"] if same else f"of {cross.get('pairs_file')}"
    diffs = [f"{key} {have.get(key)!r}, not {value!r}" for key, value in want.items() if have.get(key) != value]
    if diffs:
        raise SelfalignError(f"{folder}: trained with other settings ({'; '.join(diffs[:3])}); give another --out, "
                             "or remove that folder's parent to retrain every fold")


class CrossFitRewardJudge(PairwiseJudge):
    """Reward judges trained on GPT-4's AlpacaEval annotations, one per instruction fold: `models`/fold<k> was trained
    on every fold but k, and judges only instructions in fold k (the fold of the conversation's first user turn).

    Why: the annotations compare answers with the same GPT-4-Turbo reference outputs an AlpacaEval-style evaluation
    uses, so a judge that trained on an instruction may have learned about its reference answer. Routing each
    instruction to the model that never saw it keeps the evaluation clean (benchmarks/reward_judge_indomain.py
    trains the folds and measures their agreement)."""

    name = "reward-crossfit"

    def __init__(self, models: str | Path | None = None, batch_size: int = 8, device: str = "cpu"):
        root = Path(models) if models else default_crossfit_dir()
        dirs = sorted((d for d in root.glob("fold*") if (d / CONFIG_FILE).exists()),
                      key=lambda d: int(d.name[4:]) if d.name[4:].isdigit() else -1)
        if len(dirs) < 2 or [d.name for d in dirs] != [f"fold{k}" for k in range(len(dirs))]:
            raise SelfalignError(f"{root}: expected trained reward models fold0/ .. fold<K-1>/ (K >= 2), found "
                                 f"{[d.name for d in dirs] or 'none'}; train them once with "
                                 f"`selfalign judges train-crossfit --out {root}` (~40 min on 2 CPU cores)")
        self.judges = [RewardJudge(d, batch_size=batch_size, device=device) for d in dirs]
        trained_for = {j.cfg.get("crossfit", {}).get("folds") for j in self.judges} - {None}  # None: assembled by hand
        if trained_for - {len(dirs)}:  # instructions are routed by the fold count: every model must share it
            raise SelfalignError(f"{root}: holds {len(dirs)} fold models trained for "
                                 f"{' and '.join(map(str, sorted(trained_for)))} folds; retrain them together with "
                                 f"`selfalign judges train-crossfit --out {root}`")
        self.batch_size = batch_size

    def config(self) -> dict:
        return {"folds": [j.config() for j in self.judges]}

    def compare(self, items: list[PairwiseItem], progress: bool = False) -> list[PairwiseVerdict]:
        k = len(self.judges)
        by_fold: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            first_user = next(m["content"] for m in it.messages if m["role"] == "user")
            by_fold.setdefault(instruction_fold(first_user, k), []).append(i)
        verdicts: list = [None] * len(items)
        for fold, idx in by_fold.items():
            for i, v in zip(idx, self.judges[fold].compare([items[i] for i in idx])):
                v.details["fold"] = fold
                verdicts[i] = v
        return verdicts
