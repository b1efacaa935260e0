"""The eval data ships inside the package: the same bytes as the shared copy, each file with its source
and license, and every built-in task loads from an installed copy of the package with the repository
and ../shared out of reach."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanserve.eval.tasks import data_dir
from tests.conftest import run_in_installed_copy

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "eval"
FILES = ("wikitext2_test.raw", "arc_easy_test.jsonl", "hellaswag_val.txt.bz2", "triviaqa_sub.jsonl")


@pytest.mark.parametrize("name", FILES)
def test_packaged_file_is_the_shared_file_unchanged(name):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    assert data_dir().joinpath(name).read_bytes() == (SHARED / name).read_bytes()


def test_each_file_is_described_with_source_and_license():
    readme = data_dir().joinpath("README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in readme.splitlines() if line.startswith("| `")}
    assert set(rows) == set(FILES)
    assert "CC BY-SA 3.0" in rows["wikitext2_test.raw"] and "Merity" in rows["wikitext2_test.raw"]
    assert "CC BY-SA 4.0" in rows["arc_easy_test.jsonl"] and "Allen Institute" in rows["arc_easy_test.jsonl"]
    assert "MIT" in rows["hellaswag_val.txt.bz2"] and "Zellers" in rows["hellaswag_val.txt.bz2"]
    assert "Apache-2.0" in rows["triviaqa_sub.jsonl"] and "Joshi" in rows["triviaqa_sub.jsonl"]


def test_every_builtin_task_loads_from_the_installed_package_alone(tmp_path):
    out = run_in_installed_copy(tmp_path, """
        from leanserve.eval.tasks import builtin_task
        out = {}
        for name in ("arc_easy", "hellaswag", "triviaqa"):
            items = builtin_task(name).items()
            out[name] = [len(items), items[0].index]
        text = builtin_task("wikitext2").documents()[0].text
        out["wikitext2"] = [len(text.encode("utf-8")), text[:40]]
        print(json.dumps(out))
    """)
    assert out["arc_easy"] == [2376, 0] and out["hellaswag"] == [10042, 0] and out["triviaqa"] == [3000, 0]
    assert out["wikitext2"] == [1290590, " \n = Robert Boulter = \n \n Robert Boulter"]
