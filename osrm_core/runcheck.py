"""Checks of a run directory's files, for runs from elsewhere (an uploaded zip) and for the
readers that show them: every file a page reads is parsed and checked here, and a damaged one
gives one line that names it (``results/sweep_osrm.csv: column 'score' is missing``).

:func:`validate_run_dir` checks a whole run at once; :func:`read_result_table` and
:func:`read_summary` are the checked readers that :class:`osrm_core.rundir.RunDir` uses.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pandas as pd

from osrm_core.errors import RunFileError
from osrm_core.lock import LOCK_NAME

#: Columns of each result table (``results/``): all of them, those that must be numbers, and
#: those that no row may leave empty (a density or a normalized score may be empty).
RESULT_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "sweep": (
        ("init", "method", "density", "lambda", "task", "score", "single", "normalized"),
        ("density", "lambda", "score", "single", "normalized"),
        ("init", "method", "lambda", "task", "score", "single"),
    ),
    "interference.csv": (
        ("layer", "adapter", "data", "input_energy", "output_shift", "relative_shift", "init"),
        ("input_energy", "output_shift", "relative_shift"),
        ("layer", "adapter", "data", "input_energy", "output_shift", "init"),
    ),
    "own_energy.csv": (
        ("task", "layer", "share", "random_share", "ratio", "init"),
        ("share", "random_share", "ratio"),
        ("task", "layer", "share", "init"),
    ),
    "angles.csv": (
        ("layer", "kind", "a", "b", "min_angle", "mean_angle", "init"),
        ("min_angle", "mean_angle"),
        ("layer", "kind", "a", "b", "min_angle", "mean_angle", "init"),
    ),
}



def _schema(name: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None:
    return RESULT_COLUMNS["sweep"] if name.startswith("sweep_") and name.endswith(".csv") else RESULT_COLUMNS.get(name)


def read_csv_checked(path: str | Path, rel: str) -> pd.DataFrame:
    """A CSV file parsed, or :class:`RunFileError` naming ``rel`` (its path in the run)."""
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunFileError(f"{rel}: not a readable CSV table ({first})") from None


def read_result_table(path: str | Path, name: str) -> pd.DataFrame:
    """``results/<name>`` parsed, with its columns (and numbers where numbers belong) checked."""
    rel = f"results/{name}"
    df = read_csv_checked(path, rel)
    schema = _schema(name)
    if schema is None:
        return df
    columns, numeric, required = schema
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise RunFileError(f"{rel}: column {missing[0]!r} is missing; the columns must be {', '.join(columns)}")
    for c in required:
        empty = df[c].isna().to_numpy().nonzero()[0]
        if len(empty):
            raise RunFileError(f"{rel}: line {int(empty[0]) + 2} has no {c!r} (is the file cut short?)")
    for c in numeric:
        if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]):
            bad = pd.to_numeric(df[c], errors="coerce").isna() & df[c].notna()
            row = int(bad.to_numpy().nonzero()[0][0]) + 2 if bad.any() else 2
            raise RunFileError(f"{rel}: column {c!r} must hold numbers; line {row} holds {str(df[c].iloc[row - 2])[:40]!r}")
        if df[c].isin([math.inf, -math.inf]).any():
            raise RunFileError(f"{rel}: column {c!r} holds an infinite value")
    return df


def _check_point(point, where: str) -> None:
    if not isinstance(point, dict):
        raise RunFileError(f"{where} must be an object")
    for key in ("lambda", "avg"):
        if not _is_number(point.get(key)):
            raise RunFileError(f"{where}: {key!r} must be a number")
    for key in ("density", "normalized_avg"):
        if point.get(key) is not None and not _is_number(point.get(key)):
            raise RunFileError(f"{where}: {key!r} must be a number or null")
    _check_scores(point.get("scores"), f"{where}: 'scores'")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_scores(scores, where: str) -> None:
    if not isinstance(scores, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in scores.items()):
        raise RunFileError(f"{where} must map task names to numbers")


def read_summary(path: str | Path) -> dict:
    """``results/summary.json`` parsed, with the shape the summary page reads checked."""
    rel = "results/summary.json"
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RunFileError(f"{rel}: not valid JSON ({type(err).__name__}: {str(err)[:80]})") from None
    if not isinstance(summary, dict):
        raise RunFileError(f"{rel}: must hold a JSON object")
    for key in ("tasks", "inits"):
        if not isinstance(summary.get(key), list) or not all(isinstance(x, str) for x in summary[key]):
            raise RunFileError(f"{rel}: {key!r} must be a list of names")
    results = summary.get("results")
    if not isinstance(results, dict):
        raise RunFileError(f"{rel}: 'results' must be an object (init -> results)")
    for init, r in results.items():
        where = f"{rel}: results[{init!r}]"
        if not isinstance(r, dict) or not all(isinstance(r.get(k), dict) for k in ("single", "merged", "best")):
            raise RunFileError(f"{where} must hold the objects 'single', 'merged' and 'best'")
        _check_scores(r["single"], f"{where}['single']")
        for method, points in r["merged"].items():
            if not isinstance(points, list):
                raise RunFileError(f"{where}['merged'][{method!r}] must be a list of points")
            for k, point in enumerate(points):
                _check_point(point, f"{where}['merged'][{method!r}][{k}]")
        for method, point in r["best"].items():
            _check_point(point, f"{where}['best'][{method!r}]")
    return summary


def read_manifest(path: str | Path) -> dict:
    """``manifest.json`` parsed: an object whose ``stages`` map units to their records."""
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RunFileError(f"manifest.json: not valid JSON ({type(err).__name__}: {str(err)[:80]})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages", {}), dict):
        raise RunFileError("manifest.json: must hold a JSON object with 'stages' (unit -> record)")
    manifest.setdefault("stages", {})
    for key, unit in manifest["stages"].items():
        if not isinstance(unit, dict) or not isinstance(unit.get("files", {}), dict):
            raise RunFileError(f"manifest.json: stage {key!r} must be an object with 'files' (path -> hash)")
    return manifest


def file_hash(path: str | Path) -> str:
    """The hash the manifest records for a file (SHA-256, first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _manifest_problems(root: Path, manifest: dict) -> list[str]:
    problems = []
    for unit in manifest["stages"].values():
        for rel, recorded in unit.get("files", {}).items():
            path = root / rel
            if not path.resolve().is_relative_to(root.resolve()):
                problems.append(f"manifest.json: file {rel!r} lies outside the run")
            elif not path.is_file():
                problems.append(f"{rel}: missing (manifest.json records it)")
            elif file_hash(path) != recorded:
                problems.append(f"{rel}: its hash differs from the one manifest.json recorded "
                                "(the file was changed or damaged after it was written)")
    return problems


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def validate_run_dir(path: str | Path) -> list[str]:
    """Every problem of the run directory ``path``, one line each, naming the file (empty: whole).

    Checked: ``config.yaml``, ``manifest.json`` and the hashes it records, the result tables
    and ``summary.json``, the statistics (shapes, finite values), the adapters (config against
    weights, finite values) and the tables of its studies.
    """
    from osrm_core.adapters import read_adapter_dir
    from osrm_core.settings import RunConfig
    from osrm_core.stats import FeatureStats

    root = Path(path)
    problems: list[str] = []

    def check(read, *args) -> None:
        try:
            read(*args)
        except (ValueError, OSError) as err:
            problems.append(_first_line(err))

    check(RunConfig.from_yaml, root / "config.yaml")
    if (root / "manifest.json").is_file():
        try:
            problems += _manifest_problems(root, read_manifest(root / "manifest.json"))
        except RunFileError as err:
            problems.append(str(err))
    for p in sorted((root / "results").glob("*.csv")):
        check(read_result_table, p, p.name)
    if (root / "results" / "summary.json").is_file():
        check(read_summary, root / "results" / "summary.json")
    stats = root / "stats"
    for p in sorted(stats.glob("*.safetensors")) + sorted(d for d in stats.glob("*") if d.is_dir()):
        rel = p.relative_to(root).as_posix()
        try:
            FeatureStats.load(p)
        except (ValueError, OSError) as err:
            message = _first_line(err)
            problems.append(f"{rel}: {message.split(': ', 1)[-1] if message.startswith(p.name) else message}")
    for config in sorted((root / "adapters").glob("*/*/adapter_config.json")):
        rel = config.parent.relative_to(root).as_posix()
        check(lambda folder, where: read_adapter_dir(folder, where=where), config.parent, rel)
    for table in sorted((root / "studies").glob("*/tables/*.csv")):
        check(read_csv_checked, table, table.relative_to(root).as_posix())
    return problems


def is_run_file(path: Path) -> bool:
    """Whether a file belongs to the run's results (not a lock or an atomic write's temporary)."""
    return path.name != LOCK_NAME and not path.name.endswith(".tmp")
