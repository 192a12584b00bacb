"""Line two training runs up by iteration and say whether they match.

    python -m megatron_lite.tools.compare_logs straight.log resumed.log [--rtol 1e-6] [--quiet] [--plot out.png]

Reads Megatron's iteration lines,
    ` iteration        5/      12 | consumed samples: ... | learning rate: 1.000000E-04 | ... |
      lm loss: 4.853209E+00 | ...`
wherever they sit in a line (torchrun's `[default0]:` prefix is fine) and compares, for every
iteration both logs hold, the learning rate and the loss. By default the values must be equal
as printed (the log's seven significant digits); with --rtol they are compared as numbers,
equal when |a - b| <= rtol * max(|a|, |b|).

A log may hold several starts of a run: a restarted run appending to the same file, or the
logs of the interrupted and the resumed run concatenated. An iteration that appears more than
once takes its last occurrence, because the later start is the one that carried on from the
checkpoint; the tool says which iterations that applied to.

Prints a table of the common iterations, notes, and a verdict line:
    MATCH: iterations 1-12 identical (lr, loss)
    DIFFER: first difference at iteration 7: loss 4.853209E+00 vs 4.863209E+00
Exit status: 0 on a match, 1 on a difference (or no iteration in common), 2 when a log cannot
be read or holds no iteration line.
"""

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

# (label in the table and verdict, key in the log line)
COMPARED_FIELDS = (("lr", "learning rate"), ("loss", "lm loss"))

_ITERATION_LINE = re.compile(r"\biteration\s+(\d+)\s*/\s*(\d+)\s*\|(.*)")


class LogError(Exception):
    """A log that cannot be compared; the message names the file and what is wrong."""


@dataclass
class ParsedLog:
    path: str
    values: Dict[int, Dict[str, Optional[str]]]   # iteration -> {"lr": "1.000000E-04", "loss": ...}
    repeated: List[int] = field(default_factory=list)   # iterations seen more than once


def parse_line(line: str) -> Optional[tuple]:
    """(iteration, {label: value as printed, or None when the line lacks it}) for an iteration
    line, None for any other line."""
    match = _ITERATION_LINE.search(line)
    if match is None:
        return None
    items = {}
    for part in match.group(3).split("|"):
        key, sep, value = part.partition(":")
        if sep:
            items[key.strip()] = value.strip()
    return int(match.group(1)), {label: items.get(key) for label, key in COMPARED_FIELDS}


def read_lines(path: str) -> List[str]:
    """The lines of a log; LogError naming the file when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readlines()
    except OSError as e:
        raise LogError(f"cannot read {path}: {e.strerror or e}") from e


def parse_log(path: str) -> ParsedLog:
    """Every iteration line of `path`; a later occurrence of an iteration replaces an earlier one."""
    lines = read_lines(path)
    values: Dict[int, Dict[str, Optional[str]]] = {}
    repeated = set()
    for line in lines:
        parsed = parse_line(line)
        if parsed is None:
            continue
        iteration, row = parsed
        if iteration in values:
            repeated.add(iteration)
        values[iteration] = row
    if not values:
        raise LogError(f"{path} holds no iteration line (' iteration N/ M | ... | learning rate: ... | lm loss: "
                       f"... |'); pass the log of a training run that printed them (--log-interval)")
    return ParsedLog(path, values, sorted(repeated))


def _equal(a: Optional[str], b: Optional[str], rtol: Optional[float]) -> bool:
    if a == b:
        return True
    if rtol is None or a is None or b is None:
        return False
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=rtol, abs_tol=0.0)


def differing_fields(a: dict, b: dict, rtol: Optional[float]) -> List[str]:
    """Labels of the compared fields on which one iteration's two rows disagree."""
    return [label for label, _ in COMPARED_FIELDS if not _equal(a[label], b[label], rtol)]


def format_ranges(iterations: Sequence[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> '1-3, 5, 7-8'."""
    spans, start, prev = [], None, None
    for it in sorted(iterations):
        if start is None:
            start = prev = it
        elif it == prev + 1:
            prev = it
        else:
            spans.append((start, prev))
            start = prev = it
    if start is not None:
        spans.append((start, prev))
    return ", ".join(str(s) if s == e else f"{s}-{e}" for s, e in spans)


def format_table(a: ParsedLog, b: ParsedLog, common: Sequence[int], rtol: Optional[float]) -> str:
    """One row per common iteration: each compared field from A and from B, and which differ."""
    header = ["iteration"] + [f"{label} ({side})" for label, _ in COMPARED_FIELDS for side in ("A", "B")] + [""]
    rows = [header]
    for it in common:
        ra, rb = a.values[it], b.values[it]
        cells = [str(it)] + [row[label] or "-" for label, _ in COMPARED_FIELDS for row in (ra, rb)]
        diff = differing_fields(ra, rb, rtol)
        rows.append(cells + ([f"<- {', '.join(diff)} differ" if len(diff) > 1 else f"<- {diff[0]} differs"]
                             if diff else [""]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def verdict(a: ParsedLog, b: ParsedLog, rtol: Optional[float]) -> tuple:
    """(matched, verdict line) over the iterations both logs hold."""
    common = sorted(set(a.values) & set(b.values))
    labels = ", ".join(label for label, _ in COMPARED_FIELDS)
    if not common:
        return False, (f"DIFFER: no iteration in common ({a.path}: {format_ranges(a.values)}; "
                       f"{b.path}: {format_ranges(b.values)})")
    for it in common:
        diff = differing_fields(a.values[it], b.values[it], rtol)
        if diff:
            detail = ", ".join(f"{label} {a.values[it][label] or 'missing'} vs {b.values[it][label] or 'missing'}"
                               for label in diff)
            return False, f"DIFFER: first difference at iteration {it}: {detail}"
    how = "identical" if rtol is None else f"equal within rtol {rtol:g}"
    return True, f"MATCH: iterations {format_ranges(common)} {how} ({labels})"


def notes(a: ParsedLog, b: ParsedLog) -> List[str]:
    """What the reader should know besides the verdict: restarts, iterations only one log has."""
    out = []
    for log in (a, b):
        if log.repeated:
            out.append(f"note: {log.path}: iterations {format_ranges(log.repeated)} appear more than once "
                       f"(a restart); the later occurrence of each is used")
    for log, other in ((a, b), (b, a)):
        only = sorted(set(log.values) - set(other.values))
        if only:
            out.append(f"note: only in {log.path}: iterations {format_ranges(only)}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Compare two training logs iteration by iteration "
                                                 "(learning rate and loss).")
    parser.add_argument("log_a", metavar="A.log", help="reference run, e.g. the uninterrupted one")
    parser.add_argument("log_b", metavar="B.log", help="run to check, e.g. the interrupted and resumed one")
    parser.add_argument("--rtol", type=float, default=None,
                        help="compare as numbers within this relative tolerance instead of as printed")
    parser.add_argument("--quiet", action="store_true", help="print only the notes and the verdict, no table")
    parser.add_argument("--plot", metavar="OUT.png", default=None,
                        help="also draw both runs' loss and learning-rate curves into this image, marking restarts "
                             "and the first difference (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.rtol is not None and not args.rtol >= 0:
        parser.error(f"--rtol must be a non-negative number, got {args.rtol}")
    try:
        a, b = parse_log(args.log_a), parse_log(args.log_b)
    except LogError as e:
        print(f"compare_logs.py: error: {e}", file=sys.stderr)
        return 2
    matched, line = verdict(a, b, args.rtol)
    common = sorted(set(a.values) & set(b.values))
    if common and not args.quiet:
        print(f"A = {a.path}\nB = {b.path}")
        print(format_table(a, b, common, args.rtol))
    for note in notes(a, b):
        print(note)
    print(line)
    if args.plot:
        from megatron_lite.tools import plot_log

        first = next((it for it in common if differing_fields(a.values[it], b.values[it], args.rtol)), None)
        try:
            plot_log.plot([plot_log.read_curves(a.path), plot_log.read_curves(b.path)], args.plot,
                          first_difference=first)
        except plot_log.PlotError as e:
            print(f"compare_logs.py: error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.plot}")
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
