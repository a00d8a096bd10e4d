"""Shared fixtures: the real data folder, the embedded model, small real prompt files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from selfalign.data.loaders import shared_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    assert (d / "README.md").exists(), f"real data not found at {d} (set SELFALIGN_DATA)"
    return d


@pytest.fixture(scope="session")
def real_prompts(data_dir) -> list[dict]:
    """The first 8 rows of the real unlabelled prompt pool."""
    rows = []
    with open(data_dir / "prompts" / "unlabelled_pool.jsonl") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == 8:
                break
    return rows


@pytest.fixture
def prompts_file(tmp_path, real_prompts) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in real_prompts[:4]))
    return p


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from selfalign.models import resolve_model

    return resolve_model("smollm2-135m")


class CriticText:
    """Critique texts in the SRT Table-1 format, for the scripted critics of tests/critique and
    tests/recipes/test_srt.py."""

    prompt = [{"role": "user", "content": "Name the capital of France."}]
    feedback = "1. Weaknesses: too terse.\n2. Advice: add one fact about the city.\nOverall Score: [[5]]"

    @staticmethod
    def good(response: str, score: int) -> str:
        """A well-formed critique: weaknesses, advice, the score line, and a refinement that adds a sentence."""
        return (f"1. Identify Weaknesses: the response is short and lacks detail.\n2. Offer Actionable Advice: add one "
                f"more sentence of explanation.\nOverall Score: [[{score}]]\n\n### Improved Response\n"
                f"{response} More detail follows here.")

    @staticmethod
    def answer_in(text: str) -> str:
        """The answer inside a critic prompt (Table-1 template); else the text itself."""
        m = re.search(r"### Response\n(.*?)\n\n### Requirements", text, re.S)
        return m.group(1) if m else text

    @staticmethod
    def length_score(response: str) -> int:
        return max(1, min(10, 1 + len(response.split()) // 4))

    @staticmethod
    def critique(pid: str, score, refinement_score):
        """A parsed critique of "answer {pid}" with these scores, as the critic stage stores it."""
        from selfalign.data import Critique

        return Critique(prompt_id=pid, messages=CriticText.prompt, response=f"answer {pid}",
                        feedback=CriticText.feedback, score=score, refinement=f"refined {pid}",
                        meta={"refinement_score": refinement_score})


@pytest.fixture(scope="session")
def critic_text() -> type[CriticText]:
    return CriticText

