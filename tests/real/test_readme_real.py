"""The README's real-model section runs as written (offline: the model comes from the installed wheel)."""

import re
from pathlib import Path

from tests.test_readme import section

README = Path(__file__).resolve().parents[2] / "README.md"


def test_real_model_section_runs(smollm2_path, capsys):
    text = section(README.read_text(), "A real model, offline: SmolLM2-135M-Instruct")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1 and "smollm2_checkpoint()" in blocks[0]
    namespace: dict = {}
    exec(compile(blocks[0], "README.md real-model block", "exec"), namespace)
    assert namespace["path"] == smollm2_path
    assert namespace["metrics"]["count"] == 4 and capsys.readouterr().out.strip()
