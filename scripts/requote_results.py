"""Re-quote RESULTS.md's tables from the committed files they name, after a run regenerated them.

    python scripts/requote_results.py          # rewrite every checked number in place, at its rounding
    python scripts/requote_results.py --check  # only list the cells that differ (exit 1 if any)
    python scripts/requote_results.py --quote figures/demo/fig3_diagonal.csv --key k,k_prime \
        --columns acc_full:2%,relative:3 [--where model=resnet20]   # print a new table to paste

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


def quote(source: str, keys: list[str], columns: list[str], where: list[str]) -> str:
    """A new table in RESULTS.md's convention: its Source line, then one row per source row (filtered by
    `where`: column=value), the key columns as text and each column `name:decimals` (a trailing % quotes
    the value x 100 with a %, as the checker reads it)."""
    frame, _ = consistency.read_source(f"Source: {source} · key: {', '.join(keys)}")
    for condition in where:
        name, _, value = condition.partition("=")
        frame = frame[frame[name] == value]
    if frame.duplicated(keys).any():
        raise SystemExit(f"the keys {keys} do not identify the rows of {source} (add a key or a --where)")
    specs = [(c.partition(":")[0], c.partition(":")[2]) for c in columns]
    header = keys + [name for name, _ in specs]
    lines = [f"Source: {source} · key: {', '.join(keys)}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for _, row in frame.iterrows():
        cells = [str(row[k]).replace("|", "\\|") for k in keys]
        for name, rounding in specs:
            value = row[name]
            if rounding and value not in ("", "nan"):
                decimals, percent = int(rounding.rstrip("%")), rounding.endswith("%")
                number = float(value) * (100 if percent else 1)
                value = f"{number:.{decimals}f}" + (" %" if percent else "")
            cells.append(str(value).replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="list the differing cells, change nothing")
    p.add_argument("--quote", metavar="FILE", help="print a new table of FILE (a CSV under figures/) instead")
    p.add_argument("--key", default="", help="--quote: the columns that identify a row, comma-separated")
    p.add_argument("--columns", default="", help="--quote: name:decimals[%%], comma-separated")
    p.add_argument("--where", action="append", default=[], help="--quote: keep rows with column=value")
    args = p.parse_args(argv)
    if args.quote:
        keys = [k.strip() for k in args.key.split(",") if k.strip()]
        if not keys:
            p.error("--quote needs --key: the columns that identify a row")
        print(quote(args.quote, keys, [c.strip() for c in args.columns.split(",") if c.strip()], args.where))
        return 0
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
