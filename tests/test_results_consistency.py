"""Every number in RESULTS.md's tables equals the committed table it names, at the rounding shown.

The convention (also stated at the top of RESULTS.md):
- Every Markdown table is preceded by a line `Source: <path> · key: <col>, <col>` (blank lines between
  are allowed). <path> is a CSV under figures/, or a JSON file with `#<field>` naming an object of
  objects (e.g. `provenance.json#notebooks`: one row per entry, its name in the first key column).
- Each table row is one source row, found by the key columns (exact text; exactly one must match).
- A column whose header is a source column is checked: a number must equal the source value rounded
  to the decimals written (`81.03 %` is the value x 100); text must equal the source text. A header
  `a ± b` checks `x ± y` against columns a and b.
- Columns headed `paper...` or `note` are free text (the paper's numbers, remarks), not checked. Any
  other header must be a source column.
"""
import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "RESULTS.md"
FREE = re.compile(r"^(paper.*|note)$", re.IGNORECASE)
NUMBER = re.compile(r"^(-?\d+(?:\.(\d+))?)(\s*%)?$")


def tables(text: str):
    """(line number, source line, header, rows) of every Markdown table in `text`."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            source = lines[j] if j >= 0 and lines[j].startswith("Source:") else None
            header = split_row(lines[i])
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            yield j + 1 if source else i, source, header, rows
        else:
            i += 1


def split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|").strip("`") for c in cells]


def read_source(spec: str) -> tuple[pd.DataFrame, list[str]]:
    m = re.fullmatch(r"Source:\s*`?([^`·\s]+)`?\s*·\s*key:\s*(.+)", spec.strip())
    assert m, f"a Source line reads 'Source: <path> · key: <col>, ...', got {spec!r}"
    path, keys = m.group(1), [k.strip() for k in m.group(2).split(",")]
    file, _, field = path.partition("#")
    assert (ROOT / file).is_file(), f"{file} named in RESULTS.md is not committed"
    if file.endswith(".json"):
        data = json.loads((ROOT / file).read_text())
        for part in field.split("."):
            data = data[part]
        frame = pd.DataFrame([{keys[0]: name, **values} for name, values in data.items()]).astype(str)
    else:
        frame = pd.read_csv(ROOT / file, dtype=str, keep_default_na=False)
    return frame, keys


def check_cell(cell: str, value: str, where: str) -> None:
    m = NUMBER.match(cell.replace(",", ""))                   # 50,000 -> 50000
    if m:
        decimals = len(m.group(2) or "")
        expected = float(value) * (100 if m.group(3) else 1)
        assert float(m.group(1)) == pytest.approx(round(expected, decimals), abs=10 ** -(decimals + 6)), \
            f"{where}: RESULTS.md says {cell}, the source has {value}"
    else:
        assert cell == value, f"{where}: RESULTS.md says {cell!r}, the source has {value!r}"


def results_tables():
    return list(tables(RESULTS.read_text()))


def test_results_has_tables_and_each_names_its_source():
    found = results_tables()
    assert len(found) >= 5
    for line, source, _, _ in found:
        assert source is not None, f"RESULTS.md line {line}: a table without a 'Source: ... · key: ...' line above it"


@pytest.mark.parametrize("line, source, header, rows", results_tables(), ids=lambda v: str(v)[:60])
def test_every_number_matches_its_source(line, source, header, rows):
    frame, keys = read_source(source)
    for k in keys:
        assert k in header and k in frame.columns, f"line {line}: key {k!r} must be a column of the table and the source"
    assert rows, f"line {line}: a table with no rows (quote it again with scripts/requote_results.py --quote)"
    for row in rows:
        assert len(row) == len(header), f"line {line}: row {row} has {len(row)} cells for {len(header)} columns"
        cells = dict(zip(header, row))
        match = frame
        for k in keys:
            match = match[match[k] == cells[k]]
        assert len(match) == 1, f"line {line}: key {[cells[k] for k in keys]} matches {len(match)} rows of the source"
        source_row = match.iloc[0]
        for col, cell in cells.items():
            if col in keys or FREE.match(col):
                continue
            names = [c.strip() for c in col.split("±")]
            parts = [c.strip() for c in cell.split("±")]
            assert len(names) == len(parts), f"line {line}: column {col!r} needs {len(names)} values, got {cell!r}"
            for name, part in zip(names, parts):
                assert name in frame.columns, f"line {line}: column {name!r} is not in the source (free columns: paper..., note)"
                check_cell(part, source_row[name], f"line {line}, {cells[keys[0]]}, {name}")


def test_the_checker_catches_a_wrong_number():
    text = ("Source: figures/cifar10-cpu/fig3_diagonal.csv · key: k, k_prime\n\n"
            "| k | k_prime | relative | acc_full |\n|---|---|---|---|\n| 5 | 5 | 0.928 | 81.03 % |\n")
    (line, source, header, rows), = tables(text)
    test_every_number_matches_its_source(line, source, header, rows)           # right: passes
    with pytest.raises(AssertionError, match="0.929"):
        test_every_number_matches_its_source(line, source, header, [["5", "5", "0.929", "81.03 %"]])
    with pytest.raises(AssertionError, match="81.04"):
        test_every_number_matches_its_source(line, source, header, [["5", "5", "0.928", "81.04 %"]])
    with pytest.raises(AssertionError, match="not in the source"):
        test_every_number_matches_its_source(line, source, [*header[:3], "made_up"], rows)
    with pytest.raises(AssertionError, match="a table with no rows"):
        test_every_number_matches_its_source(line, source, header, [])


def test_a_quoted_table_passes_the_checker():
    """`scripts/requote_results.py --quote` writes new tables in the convention the checker reads."""
    spec = importlib.util.spec_from_file_location("requote", ROOT / "scripts" / "requote_results.py")
    requote = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(requote)
    text = requote.quote("figures/demo/fig3_diagonal.csv", ["k", "k_prime"], ["acc_full:2%", "relative:3"], ["k=5"])
    (line, source, header, rows), = tables(text)
    assert header == ["k", "k_prime", "acc_full", "relative"] and [r[:2] for r in rows] == [["5", "5"]]
    test_every_number_matches_its_source(line, source, header, rows)


FIGURE_FOLDERS = sorted(p.parent for p in (ROOT / "figures").glob("*/provenance.json"))


@pytest.mark.parametrize("folder", FIGURE_FOLDERS, ids=lambda p: p.name)
def test_every_committed_result_is_what_a_recorded_run_wrote(folder):
    """Each file of a figures/ folder is an output that provenance.json records for one of its notebooks, with
    the SHA-256 it had when that run wrote it: nothing left over from an older run, nothing edited by hand."""
    from classfilters.provenance import file_hash
    record = json.loads((folder / "provenance.json").read_text())
    recorded = {name: digest for entry in record["notebooks"].values() for name, digest in entry.get("outputs", {}).items()}
    present = {p.name for p in folder.iterdir() if p.is_file()} - {"provenance.json"}
    assert not present - recorded.keys(), f"{folder.name}: files no recorded run wrote (left from an older run?)"
    assert not recorded.keys() - present, f"{folder.name}: recorded outputs that are not committed"
    changed = sorted(name for name, digest in recorded.items() if file_hash(folder / name) != digest)
    assert not changed, f"{folder.name}: files changed since the run that wrote them"
