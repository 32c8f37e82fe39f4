"""`sae-seeds run` (the whole experiment), `sae-seeds plan` (what a run will do and cost, before it starts),
`sae-seeds match` (two SAE folders, local or on the Hugging Face Hub) and
`sae-seeds export` (an SAE folder in sparsify's or SAELens' layout)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback

from .config import DEFAULT_CONFIG, ConfigError, load_config
from .console import set_verbose

MAX_MESSAGE_LINES = 12


def _run(args) -> int:
    cfg = load_config(args.config, args.set, args.output)  # validated before anything starts
    set_verbose(getattr(args, "verbose", False))
    from .output_folder import check_output_folder

    check_output_folder(cfg.output_path)  # in seconds, before the pipeline's imports
    from .pipeline import run_experiment

    # checks the inputs (preflight) and prints the plan before Ray starts
    result = run_experiment(cfg, show_plan="full" if getattr(args, "verbose", False) else "compact")
    print("\nstage wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()))
    print(result["summary"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if not result["through_training"].empty:
        print("\nshared fraction through training (mean over seed pairs; last column: the final SAEs):")
        print(result["through_training"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for note in result["notes"]:
        print(f"\n{note}")
    print(f"\nresults: {result['output_dir']}")
    if result["tracking_uri"].startswith("http"):
        print(f"MLflow:  {result['ui_url']}")
    else:
        print(f"MLflow:  mlflow server --backend-store-uri {result['tracking_uri']} --host 127.0.0.1 --port 5000\n"
              f"         then open {result['ui_url']}")
    print(f"         (experiment {result['experiment_name']}; expand run {result['parent_run_id'][:8]}... "
          "for one run per SAE; docs/mlflow.md)")
    return 0


def _plan(args) -> int:
    cfg = load_config(args.config, args.set)  # validated first
    from .sizing import format_plan, plan_run

    plan = plan_run(cfg)  # refuses, naming the field, a config that cannot fit the resources it names
    print(json.dumps(plan.to_json(), indent=1) if args.json else format_plan(plan))
    return 0


def _threshold(text: str) -> float:
    """--threshold as the config's `compare.threshold`: a finite cosine in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be a finite number in [0, 1] (a cosine), got {text!r}")
    return value


def _json_safe(value):
    """JSON has no NaN or infinity: such a statistic (none is expected of finite weights) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _sae_folders(*sources: str) -> list:
    """Local SAE folders as given; `hf://owner/name[@revision][/subfolder]` ones fetched through the Hub's cache
    (every source parsed before anything is fetched)."""
    from actors.store.hub import fetch_sae_folder, is_hub_source, parse_hub_source

    for s in sources:
        if is_hub_source(s):
            parse_hub_source(s)
    return [fetch_sae_folder(s) if is_hub_source(s) else s for s in sources]


def _match(args) -> int:
    from actors.store.checkpoint import load_sae_weights
    from actors.compare.matching import match_pair

    # Checksums verified and non-finite weights refused by the loader.
    a, b = (load_sae_weights(folder) for folder in _sae_folders(args.a, args.b))
    m = match_pair(a.encoder, a.decoder, b.encoder, b.decoder, args.threshold, args.method, args.device)
    certificate = (f"certificate: {'optimal (proven)' if m.certified else 'NOT proven optimal'}; "
                   f"rounds encoder {m.rounds[0]}, decoder {m.rounds[1]}")
    if args.json:
        # exactly the documented keys; the certificate goes to stderr
        print(json.dumps({k: _json_safe(v) for k, v in m.statistics().items()}, allow_nan=False))
        print(certificate, file=sys.stderr)
    else:
        stats = m.extended_statistics()
        width = max(map(len, stats))
        for k, v in stats.items():
            print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        print(certificate)
    return 0 if m.certified else 1


def _export(args) -> int:
    from actors.store.export import export_sae

    out = export_sae(args.folder, args.layout, args.out, overwrite=args.force)
    print(f"{args.layout} SAE: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show Ray's and the libraries' own logs and progress bars (default: one line per stage) "
                             "and, on failure, the full traceback (Ray's wrappers included), not just the cause")
    parser = argparse.ArgumentParser(prog="sae-seeds", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common],
                         help="run an experiment end to end (generate, train, compare, track)")
    run.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. --set sae.widths=[256,512] (repeatable)")
    run.add_argument("--output", help="output folder (overrides output_dir)")
    run.set_defaults(func=_run)
    plan = sub.add_parser("plan", parents=[common],
                          help="what a run will do and cost (shards, storage, stacks, memory, pair tasks, FLOPs), "
                               "in seconds, without a GPU or the model's weights; refuses a config that cannot fit")
    plan.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field, e.g. --set sae.widths=[256,512] (repeatable)")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.set_defaults(func=_plan)
    match = sub.add_parser("match", parents=[common], help="match the latents of two SAE folders (sae.safetensors + cfg.json)")
    hub = "an SAE folder, or hf://owner/name[@revision][/subfolder] on the Hugging Face Hub (sparsify or SAELens)"
    match.add_argument("a", help=hub)
    match.add_argument("b", help=hub)
    match.add_argument("--threshold", type=_threshold, default=0.7,
                       help="cosine both matchings must exceed for a latent to count as shared, in [0, 1] "
                            "(default: %(default)s)")
    match.add_argument("--json", action="store_true", help="print one JSON object")
    match.add_argument("--method", choices=["auto", "dense", "sparse"], default="auto",
                       help="dense Hungarian, or the candidate-graph solver with an optimality certificate "
                            "(auto: dense up to 4096x4096)")
    match.add_argument("--device", default="cpu", help="torch device for the cosine blocks, e.g. cuda")
    match.set_defaults(func=_match)
    export = sub.add_parser("export", parents=[common], help="write an SAE folder in EleutherAI sparsify's or SAELens' layout")
    export.add_argument("folder", help="SAE folder (sae.safetensors + cfg.json) written by sae-seeds")
    export.add_argument("--layout", required=True, choices=["sparsify", "saelens"])
    export.add_argument("--out", required=True, help="folder to create")
    export.add_argument("--force", action="store_true",
                        help="replace --out if it holds an earlier export (and nothing else)")
    export.set_defaults(func=_export)
    return parser


def _short(text: str) -> str:
    lines = text.strip().splitlines() or [""]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[:MAX_MESSAGE_LINES] + [f"... ({len(lines) - MAX_MESSAGE_LINES} more lines)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """One message per failure: what failed and where (the cause, unwrapped from Ray's layers), exit code 2 for
    bad input and 1 for other failures; `--verbose` adds the whole traceback."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sae-seeds {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every failure is turned into a message
        from .errors import is_bad_input, root_cause

        cause = root_cause(err)
        if verbose:
            traceback.print_exception(err, file=sys.stderr)
        if isinstance(cause, ConfigError) or (args.command in ("run", "plan") and is_bad_input(cause)):
            print(f"sae-seeds: {_short(str(cause))}", file=sys.stderr)
            return 2
        if args.command in ("match", "export") and isinstance(
                cause, (FileNotFoundError, FileExistsError, KeyError, ValueError)):
            print(f"sae-seeds {args.command}: {_short(str(cause))}", file=sys.stderr)
            return 2
        hint = "" if verbose else "\n(run again with --verbose for the traceback)"
        print(f"sae-seeds {args.command} failed: {type(cause).__name__}: {_short(str(cause))}{hint}",
              file=sys.stderr)
        return 1
