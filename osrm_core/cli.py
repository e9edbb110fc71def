"""The ``osrm`` command line: one subcommand, one library call (the commands are in
:mod:`osrm_core.cli_commands`; here the parser and ``main``).

Exit codes: 0 success, 2 bad input (one ``error: ...`` line on stderr, no traceback),
1 internal failure.
"""

from __future__ import annotations

import argparse
import os
import sys

from osrm_core import cli_commands as commands
from osrm_core.advisor import ADVISE_BUDGET, ADVISE_DENSITIES, ADVISE_LAMBDAS, ADVISE_METHODS
from osrm_core.cli_commands import DISTRIBUTED_COMMANDS, _launch_rank
from osrm_core.constraints import CONSTRAINTS
from osrm_core.data import METRICS
from osrm_core.errors import OsrmInputError
from osrm_core.inits import INITS
from osrm_core.merge import all_param_specs
from osrm_core.params import ParamSpec
from osrm_core.settings import DEFAULT_LAMBDAS
from osrm_core.stats.sketch import SKETCH_POWER

EXAMPLES = """examples:
  osrm demo --quick --json
  osrm run config.yaml --out runs/mine
  osrm stats --task sst2=data/sst2 --task trec=data/trec --samples 100 --out runs/mine
  osrm train --task a=demo:sentiment --task b=demo:topic --init osrm --steps 200 --out runs/mine
  osrm merge --adapter a=runs/mine/adapters/osrm/a --adapter b=runs/mine/adapters/osrm/b \\
      --method ties --lambda 0.7 --out merged/
  osrm diagnose --adapter a=adA.zip --adapter b=adB/ --task a=a.csv --task b=b.csv --json
  osrm advise --adapter a=adA/ --adapter b=adB/ --task a=a.csv --task b=b.csv --out advice/
"""


# --------------------------------------------------------------------------- parser


def _common(p, *, tasks=True, adapters=False, lora_rank=True) -> None:
    """The flags most subcommands share: model, tasks or adapters, samples, seed, output."""
    p.add_argument("--model", default=None, help="Hugging Face id or path (default: packaged MiniLM)")
    if tasks:
        p.add_argument("--task", action="append", metavar="NAME=SPEC",
                       help="CSV/JSONL/TXT file (no label column: unlabeled texts), folder with "
                            "train/test, demo:KEY or hf:DATASET[/CONFIG]:SPLIT")
        p.add_argument("--metric", action="append", metavar="NAME=METRIC",
                       help=f"a task's metric, one of {', '.join(METRICS)} (default accuracy; "
                            "loss for unlabeled texts and causal LMs)")
    if adapters:
        p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="PEFT adapter folder or zip")
        p.add_argument("--allow-pickle", action="store_true", help="also load pickled adapter_model.bin")
    p.add_argument("--samples", type=int, default=100, help="samples per task for statistics")
    if lora_rank:
        p.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default=None, help="output (run) directory")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")


def _stats_flags(p, *, choice: bool = True) -> None:
    """``--stats`` (diagnose, advise: which statistics, by the memory plan) and ``--stats-dtype``
    (also merge and sweep: the dtype of RegMean's Gram matrices)."""
    if choice:
        p.add_argument("--stats", default="auto", choices=["auto", "projected", "dense"],
                       help="projected: only the adapters' projections A_j h (r x r per layer; every table but "
                            "post-hoc OSRM and the principal angles; RegMean only where its Gram matrices fit); "
                            "dense: the d x d moments (refused when they do not fit); auto (default): dense when "
                            "they fit, else projected")
    p.add_argument("--stats-dtype", default="float64", choices=["float64", "float32"],
                   help="dtype of the d x d sums: dense statistics and RegMean's Gram matrices (float32 halves "
                        "their memory; projected statistics stay float64)")


def _out_and_json(p) -> None:
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")


def _add_run_commands(sub) -> None:
    """demo, run, stats, init and train: the pipeline on a run directory."""
    p = sub.add_parser("demo", help="the whole pipeline on the embedded default: standard LoRA against "
                       "osrm_gen with A frozen at rank 32")
    p.add_argument("--quick", action="store_true", help="small settings (minutes)")
    _out_and_json(p)
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser("run", help="run or resume an experiment from a config.yaml")
    p.add_argument("config")
    p.add_argument("--jobs", type=int, default=1,
                   help="fine-tune the adapters (inits x tasks) in this many processes, the CPU cores split between them")
    _out_and_json(p)
    p.set_defaults(func=commands.cmd_run)

    p = sub.add_parser("stats", help="collect feature statistics (DIR/stats/NAME.safetensors)")
    _common(p)
    p.set_defaults(func=commands.cmd_stats)

    for name, func, helptext in (("init", commands.cmd_init, "write initialized (untrained) adapters"),
                                 ("train", commands.cmd_train, "initialize and fine-tune an adapter per task")):
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("--init", action="append", choices=list(INITS),
                       help=f"initialization, repeatable: {', '.join(INITS)}")
        if name == "train":
            p.add_argument("--steps", type=int)
            p.add_argument("--lr", type=float)
            p.add_argument("--batch-size", type=int)
            p.add_argument("--constraint", choices=list(CONSTRAINTS))
            p.add_argument("--penalty-beta", type=float, help="weight of the penalty constraints")
            p.add_argument("--b-density", type=float, help="sparse_B: share of B's entries kept (default 0.1)")
            p.add_argument("--calibration", type=float,
                           help="sparse_B: share of the steps before B's mask is fixed (default 0.1)")
        for init, method in INITS.items():  # each init's options, from its ParamSpec
            for spec in method.params:
                _param_flag(p, f"{init}-{spec.name}", f"init_param.{init}.{spec.name}", spec, f"{init}: ")
        p.set_defaults(func=func)


def _space_flag(p) -> None:
    """``--space`` of merge and sweep."""
    p.add_argument("--space", default="full", choices=["full", "core"],
                   help="merge the (d_out, d_in) deltas (full) or the LoRA factors' small core matrices (core: "
                        "the same merge for task arithmetic, TSV-M, Iso-C, Iso-CTS and CART, another one for "
                        "TIES and DARE; no dense delta held)")


def _add_merge_command(sub) -> None:
    from osrm_core.merge import MERGE_METHODS

    p = sub.add_parser("merge", help="merge adapters into one adapter (or full weights)")
    _common(p, adapters=True, lora_rank=False)
    p.add_argument("--method", default="task_arithmetic", choices=list(MERGE_METHODS), metavar="METHOD",
                   help=f"merge method: {', '.join(MERGE_METHODS)} (default task_arithmetic)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="scale of the merge, >= 0")
    for spec in all_param_specs().values():  # each method's parameters, from its dataclass
        _param_flag(p, spec.name, f"param_{spec.name}", spec)
    p.add_argument("--weights", default=None, metavar="NAME=W,...",
                   help="per-adapter weights >= 0, e.g. a=0.8,b=1.2 (1 for an adapter not named)")
    _space_flag(p)
    p.add_argument("--out-rank", type=int, default=None,
                   help="truncate the merged adapter to this rank (default: the merge's numerical rank, exact)")
    p.add_argument("--max-test", type=int, default=None,
                   help="test examples per --task when scoring the merge (all by default)")
    p.add_argument("--full", action="store_true", help="write full merged model weights")
    _stats_flags(p, choice=False)
    p.set_defaults(func=commands.cmd_merge)


def _add_adapter_commands(sub) -> None:
    """sweep, diagnose and advise: work on adapters that already exist."""
    from osrm_core.merge import MERGE_METHODS

    p = sub.add_parser("sweep", help="merged scores of adapters over lambda (and density)")
    _common(p, adapters=True, lora_rank=False)
    p.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"], choices=list(MERGE_METHODS),
                   metavar="METHOD", help=f"merge methods: {', '.join(MERGE_METHODS)} (default task_arithmetic ties)")
    p.add_argument("--lambdas", nargs="+", type=float, default=DEFAULT_LAMBDAS)
    p.add_argument("--densities", nargs="+", type=float, default=[0.5])
    p.add_argument("--param", action="append", metavar="NAME=V1,V2",
                   help="values to sweep of another merge parameter: " + ", ".join(
                       f"{s.name} ({s.help})" for s in all_param_specs().values() if s.name != "density"))
    p.add_argument("--max-test", type=int, default=None)
    _space_flag(p)
    _stats_flags(p, choice=False)
    p.set_defaults(func=commands.cmd_sweep)

    p = sub.add_parser("diagnose", help="interference, angles, own-energy and per-layer verdicts for given adapters")
    _common(p, adapters=True, lora_rank=False)
    p.add_argument("--posthoc-rank", type=int, default=None,
                   help="rank of the post-hoc OSRM subspaces (default: each adapter's own rank)")
    _stats_flags(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the base model's weights (bfloat16 halves its memory; the statistics' dtype is "
                        "--stats-dtype)")
    p.add_argument("--angles", default="dense", choices=["dense", "sketch"],
                   help="principal angles of data subspaces: dense (default) from the d x d moments, so only with "
                        "dense statistics; sketch: with projected statistics too, each task's top-k subspace sketched "
                        "in 2 + --sketch-power more passes over its texts, each angle with its stated bound (column "
                        "bound, degrees; sketch.csv: residuals and gaps per layer)")
    p.add_argument("--sketch-power", type=int, default=SKETCH_POWER,
                   help=f"power passes of the sketches (default {SKETCH_POWER}; more: a smaller bound)")
    p.set_defaults(func=commands.cmd_diagnose)

    p = sub.add_parser("advise", help="search method, lambda, density and per-adapter weights; write the advised adapter")
    _common(p, adapters=True, lora_rank=False)
    p.add_argument("--methods", nargs="+", default=list(ADVISE_METHODS))
    p.add_argument("--lambdas", nargs="+", type=float, default=list(ADVISE_LAMBDAS))
    p.add_argument("--densities", nargs="+", type=float, default=list(ADVISE_DENSITIES))
    p.add_argument("--budget", type=int, default=ADVISE_BUDGET, help="validation evaluations for the per-adapter weights")
    p.add_argument("--holdout", type=float, default=0.5, help="share of each task's samples held out from the search")
    p.add_argument("--use-train-texts", action="store_true",
                   help="also score on the train split of a task folder (its adapter may have trained on those "
                        "texts: the scores then look better than they are); by default only its test split")
    p.add_argument("--space", default="auto", choices=["auto", "full", "core"],
                   help="where the search merges: the dense deltas (full) or the LoRA factors' cores (core: no "
                        "dense delta held; TIES and DARE trim the cores, no RegMean); auto (default): full when "
                        "its copies of the deltas fit in memory")
    _stats_flags(p)
    # --samples: sample texts used per task (a seeded subset of the task's examples).
    p.set_defaults(func=commands.cmd_advise)


def _add_study_commands(sub) -> None:
    p = sub.add_parser("study", help="the evidence study: inits x constraints x seeds x ablations, with a report")
    p.add_argument("config", nargs="?", default=None, help="study YAML (base run config + what to vary)")
    p.add_argument("--quick", action="store_true", help="a small study on the demo tasks")
    p.add_argument("--jobs", type=int, default=1,
                   help="variants run in this many processes, the CPU cores split between them (default 1)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the variants as tasks of a Ray cluster (pip install 'osrm-workbench[ray]' on every "
                        "node): 'local' starts one on this machine, 'auto' joins the one `ray start` runs here, "
                        "HOST:PORT is a running cluster's head (ray://HOST:PORT through Ray Client). --out must "
                        "be a folder every node shares, at the same path")
    p.add_argument("--ray-threads", type=int, default=None, metavar="N",
                   help="CPUs (torch threads) each variant's Ray task takes (default 1)")
    _out_and_json(p)
    p.set_defaults(func=commands.cmd_study)

    p = sub.add_parser("show", help="print the summary of a run directory and each init against standard")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.cmd_show)


def _param_flag(parser: argparse.ArgumentParser, name: str, dest: str, spec: ParamSpec, what: str = "") -> None:
    """The flag ``--NAME`` of a declared parameter (a merge method's or an init's)."""
    parser.add_argument(f"--{name.replace('_', '-')}", dest=dest, default=None, choices=spec.choices,
                        type=float if spec.choices is None else str,
                        metavar=spec.name.upper() if spec.choices is None else None,
                        help=f"{what}{spec.help} (default {spec.default})".replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="osrm", description="OSRM workbench: LoRA interference, OSRM init, merging.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dist-timeout", type=float, default=None, metavar="SECONDS",
        help="under torchrun/accelerate launch: how long a rank waits for the others before failing "
             "(default $OSRM_DIST_TIMEOUT or 1800)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_merge_command(sub)
    _add_adapter_commands(sub)
    _add_study_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Under ``torchrun``/``accelerate launch`` every rank runs it: the
    commands of :data:`DISTRIBUTED_COMMANDS` share the work, the others run on rank 0 alone;
    rank 0 alone writes and prints, and an error names the rank it happened on."""
    from osrm_core.distributed import close_distributed

    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("rank", "posthoc_rank", "out_rank", "samples", "max_length", "ray_threads"):
        value = getattr(args, flag, None)
        if value is not None and value < (2 if flag == "max_length" else 1):
            dashed = flag.replace("_", "-")
            print(f"error: --{dashed} must be >= {2 if flag == 'max_length' else 1}, got {value}", file=sys.stderr)
            return 2
    if args.dist_timeout is not None:
        if not args.dist_timeout > 0:
            print(f"error: --dist-timeout must be > 0 seconds, got {args.dist_timeout:g}", file=sys.stderr)
            return 2
        os.environ["OSRM_DIST_TIMEOUT"] = str(args.dist_timeout)
    try:
        rank, world = _launch_rank()
    except OsrmInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if rank != 0 and args.command not in DISTRIBUTED_COMMANDS:
        return 0  # a single-process command: rank 0 does it
    where = f"rank {rank}/{world}: " if world > 1 else ""
    try:
        args.func(args)
    except OsrmInputError as err:  # bad input: one line, exit 2
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"error: {where}{message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is a bug: one line, exit 1
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"internal error: {where}{type(err).__name__}: {message}", file=sys.stderr)
        return 1
    finally:
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
