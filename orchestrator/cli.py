"""`sae-seeds run` (the whole experiment), `sae-seeds match` (two SAE folders, local or on the Hugging Face Hub) and
`sae-seeds export` (an SAE folder in sparsify's or SAELens' layout)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import DEFAULT_CONFIG, ConfigError, load_config


def _run(args) -> int:
    cfg = load_config(args.config, args.set, args.output)  # validated before anything starts
    from .pipeline import run_experiment

    result = run_experiment(cfg)
    print("\nstage wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["timings"].items()))
    print(result["summary"].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nresults: {result['output_dir']}")
    print(f"MLflow:  mlflow ui --backend-store-uri {result['tracking_uri']}   "
          f"(experiment {result['experiment_id']}, parent run {result['parent_run_id']})")
    return 0


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

    a, b = (load_sae_weights(folder) for folder in _sae_folders(args.a, args.b))
    m = match_pair(a.encoder, a.decoder, b.encoder, b.decoder, args.threshold, args.method, args.device)
    certificate = (f"certificate: {'optimal (proven)' if m.certified else 'NOT proven optimal'}; "
                   f"rounds encoder {m.rounds[0]}, decoder {m.rounds[1]}")
    if args.json:
        print(json.dumps(m.statistics()))  # exactly the documented keys; the certificate goes to stderr
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
    parser = argparse.ArgumentParser(prog="sae-seeds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment end to end (generate, train, compare, track)")
    run.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a field, e.g. --set sae.widths=[256,512] (repeatable)")
    run.add_argument("--output", help="output folder (overrides output_dir)")
    run.set_defaults(func=_run)
    match = sub.add_parser("match", help="match the latents of two SAE folders (sae.safetensors + cfg.json)")
    hub = "an SAE folder, or hf://owner/name[@revision][/subfolder] on the Hugging Face Hub (sparsify or SAELens)"
    match.add_argument("a", help=hub)
    match.add_argument("b", help=hub)
    match.add_argument("--threshold", type=float, default=0.7)
    match.add_argument("--json", action="store_true", help="print one JSON object")
    match.add_argument("--method", choices=["auto", "dense", "sparse"], default="auto",
                       help="dense Hungarian, or the candidate-graph solver with an optimality certificate "
                            "(auto: dense up to 4096x4096)")
    match.add_argument("--device", default="cpu", help="torch device for the cosine blocks, e.g. cuda")
    match.set_defaults(func=_match)
    export = sub.add_parser("export", help="write an SAE folder in EleutherAI sparsify's or SAELens' layout")
    export.add_argument("folder", help="SAE folder (sae.safetensors + cfg.json) written by sae-seeds")
    export.add_argument("--layout", required=True, choices=["sparsify", "saelens"])
    export.add_argument("--out", required=True, help="folder to create")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"sae-seeds: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        if args.command not in ("match", "export"):
            raise
        print(f"sae-seeds {args.command}: {err}", file=sys.stderr)
        return 2
