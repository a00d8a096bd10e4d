"""The README's Python example runs as written (in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # the data folder comes from shared_data_dir(), as for a user
    out = capsys.readouterr().out.splitlines()
    assert out == ["[1.0, 1.0]", "[6, 6] 8"]  # both answers are longer than "A short answer."; the smoke config
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2
