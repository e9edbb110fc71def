"""Studies that grow: which finished runs a new study config may reuse.

A study's variants are run directories. A variant is defined by its run config except its name
and its merge settings. A new config may add variants (seeds, inits, ablations) and change merge
settings (methods, lambdas, densities: only the sweeps are computed again); it may not change
the settings of a variant that exists. A finished variant's ``config.yaml`` is read by the
current code, so a setting added by a later version takes its default there and the study still
grows after an upgrade.
"""

from __future__ import annotations

from pathlib import Path

from osrm_core.pipeline import Pipeline
from osrm_core.rundir import RunDir
from osrm_core.settings import ConfigError, RunConfig


def variant_settings(config: RunConfig) -> dict:
    """The settings that define a run's statistics and adapters, flat: its whole config but its
    name and merge settings."""
    return _flat(config.model_dump(mode="json", exclude={"name", "merge"}))


def check_growth(out: str | Path, planned: list[tuple[str, RunConfig]]) -> None:
    """Raise ConfigError naming the first planned variant (name, config) whose run in
    ``out/runs/<name>`` was made with other settings (merge settings aside)."""
    out = Path(out)
    for name, config in planned:
        run = RunDir(out / "runs" / name)
        if not run.exists():
            continue
        before, after = variant_settings(run.config()), variant_settings(config)
        changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        if changed:
            raise ConfigError(
                f"study directory {str(out)!r}: variant {name!r} was run with other settings "
                f"({', '.join(changed)} changed); only seeds, inits, variants, ablations, "
                "merge methods and lambdas can be added to a study: use another --out"
            )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, x in d.items():
        out.update(_flat(x, f"{prefix}{k}.") if isinstance(x, dict) else {f"{prefix}{k}": x})
    return out


def prepare_run(pipeline: Pipeline) -> None:
    """Create the pipeline's run directory, or take its new merge settings into the existing one
    (its sweeps are then computed again)."""
    if pipeline.run.exists():
        pipeline.run.take_merge_settings(pipeline.config)
    pipeline.run.create(pipeline.config)
