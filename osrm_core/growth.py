"""Studies that grow: which finished runs a new study config may reuse.

A study's variants are run directories. A variant is defined by its run config except its name
and its merge settings; :func:`variant_hash` hashes exactly that and is stored with the run
(``variant.json``). A new config may add variants (seeds, inits, ablations) and change merge
settings (methods, lambdas, densities: only the sweeps are computed again); it may not change
the settings of a variant that exists.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from osrm_core.atomic import write_json
from osrm_core.pipeline import Pipeline
from osrm_core.rundir import RunDir
from osrm_core.settings import ConfigError, RunConfig


def variant_hash(config: RunConfig) -> str:
    """Hash of the settings that define a run's statistics and adapters: its whole config but
    its name and merge settings."""
    settings = json.dumps(config.model_dump(mode="json", exclude={"name", "merge"}), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def check_growth(out: str | Path, planned: list[tuple[str, RunConfig]]) -> None:
    """Raise ConfigError naming the first planned variant (name, config) whose run in
    ``out/runs/<name>`` was made with other settings (merge settings aside)."""
    out = Path(out)
    for name, config in planned:
        run = RunDir(out / "runs" / name)
        if not run.exists():
            continue
        stored = run.path / "variant.json"
        old = json.loads(stored.read_text(encoding="utf-8"))["hash"] if stored.is_file() else variant_hash(run.config())
        if old != variant_hash(config):
            before, after = _flat(run.config().model_dump(mode="json")), _flat(config.model_dump(mode="json"))
            changed = [k for k in sorted(set(before) | set(after))
                       if before.get(k) != after.get(k) and k != "name" and not k.startswith("merge.")]
            raise ConfigError(
                f"study directory {str(out)!r}: variant {name!r} was run with other settings "
                f"({', '.join(changed) or 'settings hash'} changed); only seeds, inits, variants, ablations, "
                "merge methods and lambdas can be added to a study: use another --out"
            )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, x in d.items():
        out.update(_flat(x, f"{prefix}{k}.") if isinstance(x, dict) else {f"{prefix}{k}": x})
    return out


def prepare_run(pipeline: Pipeline) -> None:
    """Create the pipeline's run directory, or take its new merge settings into the existing one
    (its sweeps are then computed again), and store the variant's hash with it."""
    if pipeline.run.exists():
        pipeline.run.take_merge_settings(pipeline.config)
    pipeline.run.create(pipeline.config)
    write_json(pipeline.run.path / "variant.json", {"hash": variant_hash(pipeline.config)})
