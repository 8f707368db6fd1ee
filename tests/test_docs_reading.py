"""Every ```python snippet of docs/reading.md runs, in order, against a real small dataset (CIFAR-10
pixels, JPEG shards); blocks marked ``{not-run: why}`` need a package the tests do not install."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from etc_data.prepare import PrepareConfig, prepare_dataset

from .conftest import make_mini_npz

DOC = Path(__file__).resolve().parents[1] / "docs" / "reading.md"
BLOCK = re.compile(r"^```(python[^\n]*)\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, str]]:
    return [(info.strip(), code) for info, code in BLOCK.findall(DOC.read_text())]


def test_every_python_snippet_is_run_or_says_why_not():
    blocks = snippets()
    assert len([b for b in blocks if b[0] == "python"]) >= 6
    assert all(info == "python" or re.fullmatch(r"python \{not-run: .+\}", info) for info, _ in blocks)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_python_snippets_of_reading_md_run(tmp_path, cifar_exact, key_file, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    src = make_mini_npz(tmp_path / "cifar10.npz", cifar_exact, 300, 60)
    root = tmp_path / "root"
    prepare_dataset(PrepareConfig(source=str(src), out=str(root), dataset="cifar10", key_ref=str(key_file),
                                  shard_size=100, workers=1))
    ns = {"ROOT": str(root)}
    ran = 0
    for info, code in snippets():
        if info == "python":
            exec(compile(code, f"{DOC.name} snippet {ran + 1}", "exec"), ns)
            ran += 1
    assert ran >= 6 and ns["dd"]["test"].num_rows == 60
