"""A dataset entry's `name` (a dataset configuration): read from a local directory in the hub layout,
an error wherever it cannot mean anything. Local files only; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxtune.config import DatasetConfig
from jaxtune.data.sources import DataSourceError, load_rows

README = """---
license: mit
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.jsonl
  - split: test
    path: en/test.jsonl
- config_name: fr
  data_files: fr/*.jsonl
---
# Greetings
"""


def rows(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture
def hub_layout(tmp_path) -> Path:
    root = tmp_path / "greetings"
    rows(root / "en" / "train.jsonl", ["hello", "hi"])
    rows(root / "en" / "test.jsonl", ["hey"])
    rows(root / "fr" / "train.jsonl", ["bonjour"])
    (root / "README.md").write_text(README)
    return root


def texts(entry: dict, index: int = 0) -> list[str]:
    return [r["text"] for r in load_rows(DatasetConfig(type="completion", **entry), index)]


def test_name_selects_a_configuration_of_a_local_hub_layout(hub_layout):
    assert texts({"path": str(hub_layout), "name": "fr"}) == ["bonjour"]
    assert texts({"path": str(hub_layout), "name": "en"}) == ["hello", "hi"]
    assert texts({"path": str(hub_layout), "name": "en", "split": "test"}) == ["hey"]
    with pytest.raises(DataSourceError, match=r"datasets\[2\].*no configuration 'de' in .*README\.md "
                                              r"\(has \['en', 'fr'\]\)"):
        texts({"path": str(hub_layout), "name": "de"}, 2)
    # Without a name the directory's files are not mixed: a default configuration is needed.
    with pytest.raises(DataSourceError, match=r"lists configurations \['en', 'fr'\] and none is the default; "
                                              "set name:"):
        texts({"path": str(hub_layout)})
    (hub_layout / "README.md").write_text(README.replace("- config_name: fr\n", "- config_name: fr\n  default: true\n"))
    assert texts({"path": str(hub_layout)}) == ["bonjour"]
    # data_files picks files itself (as before); with a name as well it is ambiguous.
    assert texts({"path": str(hub_layout), "data_files": "en/test.jsonl"}) == ["hey"]
    with pytest.raises(DataSourceError, match="name: en selects a configuration of README.md and data_files"):
        texts({"path": str(hub_layout), "name": "en", "data_files": "en/test.jsonl"})


def test_name_where_it_cannot_apply_is_an_error(tmp_path, hub_layout):
    import datasets

    single = hub_layout / "en" / "train.jsonl"
    with pytest.raises(DataSourceError, match=r"datasets\[1\] .*train\.jsonl\): name: en cannot apply: a single "
                                              "local file has no configurations; remove it"):
        texts({"path": str(single), "name": "en"}, 1)
    # per-config folders without README configs: no configuration to pick, the folder is named in the hint
    (hub_layout / "README.md").unlink()
    with pytest.raises(DataSourceError, match=r"name: fr selects a configuration, but the directory declares none.*"
                                              r"to read the folder fr/, set path: .*greetings/fr"):
        texts({"path": str(hub_layout), "name": "fr"})
    assert texts({"path": str(hub_layout / "fr")}) == ["bonjour"]
    datasets.Dataset.from_list([{"text": "saved"}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataSourceError, match="name: x cannot apply: a save_to_disk directory"):
        texts({"path": str(tmp_path / "saved"), "name": "x"})
    with pytest.raises(DataSourceError, match="name: en cannot apply: fsspec URLs are read as files"):
        texts({"path": f"file://{single}", "name": "en"})
    # and without a name every source reads as before
    assert texts({"path": str(single)}) == ["hello", "hi"]
    assert texts({"path": str(tmp_path / "saved")}) == ["saved"]
