"""The ``rtqa`` command. Each subcommand parses its arguments here and calls one function of its module.

Exit codes (docs/architecture.md, "Command-line contract"): 0 success, 2 bad usage or unreadable input with a
clear message, 1 an internal error. ``--json`` prints one JSON document on stdout and nothing else there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from rtqa_node import __version__
from rtqa_node.errors import ConfigError, InputError

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace, **overrides):
    from rtqa_node.config import load_settings

    return load_settings(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None), **overrides)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument(
        "--data-dir", type=Path, help="store and index directory (default: $RTQA_DATA_DIR or ./rtqa-data)"
    )


def print_json(document) -> None:
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# -- serve -------------------------------------------------------------------------------------------------


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the DICOM node (storage SCP) until interrupted")
    _add_data_dir(p)
    p.add_argument("--port", type=int, help="TCP port to listen on (0: any free port; default 11112)")
    p.add_argument("--ae-title", help="the node's AE title (default RTQA)")
    p.add_argument("--bind", dest="bind_address", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--workers", type=int, help="review worker processes to start beside the SCP")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from rtqa_node.node import serve

    settings = _settings(args, port=args.port, ae_title=args.ae_title, bind_address=args.bind_address,
                         workers=args.workers)
    return serve(settings)


# -- worker ------------------------------------------------------------------------------------------------


def _add_worker(sub) -> None:
    p = sub.add_parser("worker", help="run a review/dispatch worker: lease jobs from the node's queue until stopped")
    _add_data_dir(p)
    p.set_defaults(run=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from rtqa_node.worker import run_worker

    settings = _settings(args)
    if not settings.index_path.exists():
        raise InputError(f"no node data in {settings.data_dir} (no index.sqlite); start `rtqa serve` first")
    return run_worker(settings)


# -- status ------------------------------------------------------------------------------------------------


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="what the node holds: studies, plan studies, objects, jobs")
    _add_data_dir(p)
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(run=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from rtqa_node.status import collect_status, format_status

    settings = _settings(args)
    if not settings.index_path.exists():
        raise InputError(f"no node data in {settings.data_dir} (no index.sqlite); start `rtqa serve` first")
    document = collect_status(settings)
    if args.json:
        print_json(document)
    else:
        sys.stdout.write(format_status(document))
    return 0


# -- demo --------------------------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="start a node, send it a plan study with DCMTK storescu, show the result")
    p.add_argument("--data-dir", type=Path, default=Path("demo-out"), help="where the demo node keeps its data")
    p.add_argument(
        "--plan-study",
        type=Path,
        help="folder of DICOM files to send (default: a public chain from $RTQA_TEST_DATA if present, "
        "else a synthetic plan study made by `rtqa synth`)",
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from rtqa_node.demo import run_demo

    return run_demo(data_dir=args.data_dir, plan_study=args.plan_study)


COMMANDS: list[Callable] = [_add_serve, _add_worker, _add_status, _add_demo]


# -- dvh ---------------------------------------------------------------------------------------------------


def _add_dvh(sub) -> None:
    p = sub.add_parser("dvh", help="DVHs and dose metrics of every structure, per dose object")
    p.add_argument("path", type=Path, help="folder of DICOM files (searched recursively) or one file")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON document on stdout")
    fmt.add_argument("--csv", action="store_true", help="metrics as CSV on stdout")
    p.add_argument("--png", type=Path, help="also write a DVH plot to this PNG file")
    p.set_defaults(run=_run_dvh)


def _run_dvh(args: argparse.Namespace) -> int:
    from rtqa_node.rt.dvh_report import run_dvh

    text, document = run_dvh(args.path, output="json" if args.json else "csv" if args.csv else "table",
                             png=args.png)
    if document is not None:
        print_json(document)
    else:
        sys.stdout.write(text)
    return 0


COMMANDS.append(_add_dvh)


# -- synth -------------------------------------------------------------------------------------------------


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic head-and-neck cohort: CT, RTSTRUCT, RTPLAN, RTDOSE + truth")
    p.add_argument("--patients", type=int, required=True, help="number of patients")
    p.add_argument("--sites", type=int, default=1, help="institutions, with systematic differences (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or an earlier synth output)")
    p.add_argument("--slices", type=int, default=80, help="CT slices of 3 mm per patient (30-400, default 80)")
    p.add_argument("--deviation-rate", type=float, default=0.3,
                   help="mean chance of a planted protocol deviation per plan (default 0.3)")
    p.add_argument("--report", action="store_true", help="also write report.md (cohort summary, planted signal)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from rtqa_node.synth.cohort import CohortConfig, generate_cohort, summarise

    config = CohortConfig(patients=args.patients, sites=args.sites, seed=args.seed, slices=args.slices,
                          deviation_rate=args.deviation_rate)
    manifest = generate_cohort(args.out, config, report=args.report)
    summary = summarise(manifest, args.out)
    if args.json:
        print_json(summary)
    else:
        sys.stdout.write(summary["text"])
    return 0


COMMANDS.append(_add_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtqa", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rtqa-node {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("RTQA_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rtqa_node.log import configure

    configure(args.log_level.upper())
    try:
        return args.run(args)
    except (ConfigError, InputError) as exc:
        print(f"rtqa {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        log.exception("internal_error", extra={"command": args.command})
        print(f"rtqa {args.command}: internal error (a bug); details in the log above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
