"""Re-quote RESULTS.md's tables from the committed files they name, after a run regenerated them.

    python scripts/requote_results.py          # rewrite every checked number in place, at its rounding
    python scripts/requote_results.py --check  # only list the cells that differ (exit 1 if any)

Each table's `Source: <file> · key: ...` line and rows are read with the parser of
tests/test_results_consistency.py (one convention, one parser); every checked number is written
again from its source at the decimals (and %) it already has. Rows, keys and prose are not touched:
a row whose key is gone, or a new row, is for the author; the test then checks the result.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("consistency", ROOT / "tests" / "test_results_consistency.py")
consistency = importlib.util.module_from_spec(spec)
spec.loader.exec_module(consistency)


def requoted(cell: str, value: str) -> str:
    """`cell` written again from `value` at its own rounding; text cells are returned unchanged."""
    m = consistency.NUMBER.match(cell.replace(",", ""))
    if not m:
        return cell
    decimals = len(m.group(2) or "")
    number = float(value) * (100 if m.group(3) else 1)
    text = f"{number:,.{decimals}f}" if "," in cell else f"{number:.{decimals}f}"
    return text + (m.group(3) or "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="list the differing cells, change nothing")
    args = p.parse_args(argv)
    lines = consistency.RESULTS.read_text().splitlines()
    changed = []
    for line, source, header, rows in consistency.tables("\n".join(lines)):
        if source is None:
            continue
        frame, keys = consistency.read_source(source)
        first_row = next(i for i in range(line, len(lines)) if lines[i].startswith("|")) + 2
        for r, row in enumerate(rows):
            match = frame
            for key in keys:
                match = match[match[key] == row[header.index(key)]]
            if len(match) != 1:
                continue
            cells = list(row)
            for c, name in enumerate(header):
                if name in keys or consistency.FREE.match(name) or name not in frame.columns:
                    continue
                new = requoted(cells[c], match.iloc[0][name])
                if new != cells[c]:
                    changed.append(f"line {first_row + r + 1}: {name} {cells[c]} -> {new}")
                    cells[c] = new
            lines[first_row + r] = "| " + " | ".join(cells) + " |"
    print("\n".join(changed) or "every checked number already equals its source")
    if not args.check and changed:
        consistency.RESULTS.write_text("\n".join(lines) + "\n")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
