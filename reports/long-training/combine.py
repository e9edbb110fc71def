"""One report over the two long-training study folders that ran side by side.

    python reports/long-training/combine.py ../runs/long-training ../runs/long-training-controls \
        ../runs/long-training-osrm-gen

Links every finished variant (a run with its summary) of both folders into ``../runs/long-training-all/runs`` and writes
the study report over all of them there, then copies ``report.md``, ``tables/``, ``figures/`` and
the wall times into this folder.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from osrm_core.study import StudyConfig, study_seconds
from osrm_core.study_report import write_report

HERE = Path(__file__).parent


def main(folders: list[str]) -> None:
    studies = [StudyConfig.from_yaml(Path(f) / "study.yaml") for f in folders]
    first = studies[0]
    inits = list(dict.fromkeys(i for s in studies for i in s.inits))
    extra = [v for s in studies for v in s.variants]
    combined = first.model_copy(update={"inits": inits, "variants": extra})
    out = Path(folders[0]).parent / "long-training-all"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for folder in folders:
        for run in sorted((Path(folder) / "runs").iterdir()):
            link = out / "runs" / run.name
            if (run / "results" / "summary.json").is_file() and not link.exists():
                link.symlink_to(run.resolve(), target_is_directory=True)
    seconds = {str(f): study_seconds(f) for f in folders}
    (out / "timing.json").write_text(json.dumps({"seconds": round(sum(seconds.values()), 1)}))
    write_report(combined, out)
    for name in ("tables", "figures"):
        shutil.rmtree(HERE / name, ignore_errors=True)
        shutil.copytree(out / name, HERE / name)
    shutil.copyfile(out / "report.md", HERE / "report.md")
    (HERE / "timing.json").write_text(json.dumps(
        {"seconds_per_folder": seconds, "note": "the folders ran side by side, one thread each"}, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
