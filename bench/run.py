"""Benchmark suite: each hot path against its baseline, side by side, as ratios.

    python bench/run.py --quick                 # every item, in under 5 minutes, one table
    python bench/run.py --quick --json out.json # the same rows as JSON
    python bench/run.py --items 1a,2            # some items (1 = 1a,1b; 2 = 2b,2c; 3 = 3,3b; ...)
    python bench/run.py                         # larger settings (several minutes more)

Each figure is a ratio of two measurements made in the same run, interleaved and repeated
(medians), because the machine is shared and absolute CPU times mean little. Item 6 (GPU) is
``bench/gpu.sh``; here it is reported as pending unless a CUDA device is present.
Exit status 0 when every benchmark ran (missed goals are in the table), 1 on an error, and
with ``--strict`` also 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Context, Row, setup_process  # noqa: E402

#: The module that measures each item (item 6 runs on a GPU: bench/gpu.sh; here it is a pending row).
MODULES = {
    "bench_stats": ["1a", "1b"], "bench_sweep": ["2b", "2c"], "bench_train": ["3", "3b"],
    "bench_memory": ["4a", "4b"], "bench_app": ["5"], "bench_gpu": ["6"], "bench_advise": ["7a", "7b"],
    "bench_study": ["8"], "bench_startup": ["9"],
}
ALL = sorted((i for parts in MODULES.values() for i in parts), key=lambda i: (int(i.rstrip("abc")), i))
#: Items by number: "1" is 1a and 1b.
ITEMS = {n: [i for i in ALL if i.rstrip("abc") == n] for n in dict.fromkeys(i.rstrip("abc") for i in ALL)}


def parse_items(text: str | None) -> list[str]:
    if not text:
        return list(ALL)
    out: list[str] = []
    for part in text.replace(" ", "").split(","):
        if part in ITEMS:
            out += ITEMS[part]
        elif part in ALL:
            out.append(part)
        else:
            raise SystemExit(f"error: unknown item {part!r}; known: {', '.join(ITEMS)} or {', '.join(ALL)}")
    return [i for i in ALL if i in out]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}{unit}"
    return f"{value:.3g}{unit}"


def format_table(rows: list[Row]) -> str:
    header = ["item", "benchmark", "figure", "goal", "status", "ours", "baseline", "n"]
    lines = [
        [
            r.item,
            r.name,
            _fmt(r.figure, r.unit),
            r.goal,
            r.status,
            _fmt(r.ours),
            _fmt(r.baseline),
            str(r.repeats),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    sep = "  "
    out = [sep.join(h.ljust(w) for h, w in zip(header, widths)), sep.join("-" * w for w in widths)]
    out += [sep.join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="small settings: the whole suite in under 5 minutes"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument(
        "--items", help="comma-separated items: 1..9 or 1a,1b,2b,2c,3,3b,4a,4b,5,6,7a,7b,8,9 (default all)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="repeats of each measurement (>= 3; default 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads, the same for both sides (default 1)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    items = parse_items(args.items)

    setup_process(args.threads)
    command = "python bench/run.py" + (" --quick" if args.quick else "")
    if args.threads != 1:
        command += f" --threads {args.threads}"
    if args.repeats != 3:
        command += f" --repeats {args.repeats}"
    ctx = Context(
        quick=args.quick, repeats=args.repeats, threads=args.threads, command=command, verbose=not args.quiet
    )
    started = time.perf_counter()

    import importlib

    rows: list[Row] = []
    wanted = set(items)
    for name, parts in MODULES.items():
        if name != "bench_gpu" and wanted & set(parts):
            rows += importlib.import_module(f"bench.{name}").run(ctx, wanted)
    if "6" in wanted:
        from bench import bench_gpu

        rows.append(bench_gpu.pending_row(ctx))

    elapsed = time.perf_counter() - started
    print(format_table(rows))
    print(
        f"\n{len(rows)} rows in {elapsed:.0f} s; {args.threads} torch thread(s); figures are medians of paired ratios"
    )
    if args.json:
        import torch

        payload = {
            "command": command + (f" --items {args.items}" if args.items else ""),
            "seconds": round(elapsed, 1),
            "quick": args.quick,
            "threads": args.threads,
            "repeats": args.repeats,
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "rows": [r.to_dict() for r in rows],
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if args.strict and any(r.met is False for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
