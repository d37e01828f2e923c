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
    p = sub.add_parser("synth", help="write a synthetic head-and-neck cohort: CT, RTSTRUCT, RTPLAN/RT Ion Plan, "
                                     "RTDOSE + ground truth")
    p.add_argument("--patients", type=int, required=True, help="number of patients")
    p.add_argument("--sites", type=int, default=1, help="institutions, with systematic differences (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--out", type=Path, required=True, help="output folder (new, empty, or an earlier synth output)")
    p.add_argument("--slices", type=int, default=80, help="CT slices of 3 mm per patient (30-400, default 80)")
    p.add_argument("--deviation-rate", type=float, default=0.3,
                   help="mean chance of a planted protocol deviation per plan (default 0.3)")
    p.add_argument("--modality", default="photon", choices=("photon", "proton", "carbon", "mixed"),
                   help="photon (RTPLAN), proton or carbon (RT Ion Plan, RBE-weighted EFFECTIVE dose), or mixed "
                        "(60/30/10 %%) (default photon)")
    p.add_argument("--reviewers", type=int, default=3, help="simulated central QA reviewers per plan (default 3)")
    p.add_argument("--jobs", type=int, default=1, help="patients written in parallel processes (default 1)")
    p.add_argument("--report", action="store_true",
                   help="also write report.md and PNG plots (outcome rates, dose-response, kappas, contours)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from rtqa_node.synth.cohort import CohortConfig, generate_cohort, summarise

    config = CohortConfig(patients=args.patients, sites=args.sites, seed=args.seed, slices=args.slices,
                          deviation_rate=args.deviation_rate, modality=args.modality, reviewers=args.reviewers)
    manifest = generate_cohort(args.out, config, report=args.report, jobs=args.jobs)
    summary = summarise(manifest, args.out)
    if args.json:
        print_json(summary)
    else:
        sys.stdout.write(summary["text"])
    return 0


COMMANDS.append(_add_synth)


# -- train / evaluate ----------------------------------------------------------------------------------------


def _add_cohort_args(p, *, default_seed: int, default_patients: int) -> None:
    p.add_argument("--data", type=Path, help="folder of plan studies (one per subfolder, e.g. `rtqa synth` output)")
    p.add_argument("--labels", type=Path, help="labels CSV for --data (folder, reviewer_1..R, consensus, endpoints); "
                   "default: the folder's ground_truth.json / manifest.json")
    p.add_argument("--patients", type=int, default=default_patients,
                   help=f"without --data: simulate this many synthetic patients in memory (default {default_patients})")
    p.add_argument("--seed", type=int, default=default_seed, help=f"synthetic cohort seed (default {default_seed})")
    p.add_argument("--first", type=int, default=0,
                   help="index of the first simulated patient (default 0): with the training seed and --first at or "
                        "past the training patients, new patients from the same sites and reviewers")
    p.add_argument("--sites", type=int, default=3, help="synthetic cohort sites (default 3)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rtqa-node",
                   help="cache of simulated bags (default ~/.cache/rtqa-node)")
    p.add_argument("--jobs", type=int, default=1, help="processes simulating the synthetic cohort (default 1)")


def _cohort(args):
    from rtqa_node.ml.dataset import _synth_source_digest as source_digest
    from rtqa_node.ml.dataset import cohort_from_folder, simulate_cohort

    if args.data is not None:
        if not args.data.is_dir():
            raise InputError(f"--data {args.data} is not a folder")
        try:
            return cohort_from_folder(args.data, args.labels), {"source": str(args.data)}
        except FileNotFoundError as exc:
            raise InputError(str(exc)) from exc
    if args.patients < 4:
        raise InputError(f"--patients must be >= 4, got {args.patients}")
    if args.first < 0:
        raise InputError(f"--first must be >= 0, got {args.first}")
    data = {"source": "synthetic", "patients": args.patients, "seed": args.seed, "sites": args.sites,
            "synth_digest": source_digest()}
    if args.first:
        data["first"] = args.first
    return (simulate_cohort(patients=args.patients, seed=args.seed, sites=args.sites, cache_dir=args.cache,
                            first=args.first, jobs=args.jobs), data)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the MIL models (tabular, mean-pooling, spatial, fused) on a cohort")
    _add_cohort_args(p, default_seed=1, default_patients=300)
    p.add_argument("--model", action="append", choices=("tabular", "tabular_mean", "spatial", "fused"),
                   help="model(s) to train (repeatable; default all four)")
    p.add_argument("--out", type=Path, default=Path("models"), help="folder for models/<name>/ (default models)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs (default 10)")
    p.add_argument("--entropy-weight", type=float, default=0.05,
                   help="voxel-attention entropy prior of spatial and fused models (default 0.05)")
    p.add_argument("--no-localise", dest="localise", action="store_false",
                   help="start the spatial attention uniform instead of from a dose-response scan (ml.localise)")
    p.add_argument("--train-seed", type=int, default=0, help="split and initialisation seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from rtqa_node.ml.train import WEIGHTS_NAME, TrainConfig, TrainedModel, train, write_model_card

    cohort, data = _cohort(args)
    out, trained = [], {}
    for kind in args.model or ["tabular", "tabular_mean", "spatial", "fused"]:
        init = {}
        for k in ("tabular", "spatial") if kind == "fused" else ():
            if k in trained:
                init[k] = trained[k]
            elif (args.out / k / WEIGHTS_NAME).exists():  # trained earlier into --out: same cohort only
                earlier = TrainedModel.load(args.out / k)
                if earlier.record.get("data") == data:
                    init[k] = earlier
        model = train(cohort, TrainConfig(model=kind, epochs=args.epochs, patience=args.patience,
                                          attention_entropy_weight=args.entropy_weight, seed=args.train_seed,
                                          localise=args.localise, threads=args.threads), name=kind, init=init)
        trained[kind] = model
        model.record["data"] = data
        model.save(args.out / kind)
        write_model_card(model, args.out / kind)
        out.append({"model": kind, "folder": str(args.out / kind), **{k: v for k, v in model.record.items()
                                                                       if k != "history"}})
    if args.json:
        print_json(out)
    else:
        for r in out:
            sys.stdout.write(f"{r['model']}: best epoch {r['best_epoch']}, val loss {r['best_val_loss']}, "
                             f"{r['train_time_s']} s -> {r['folder']}\n")
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate trained models and baselines on a held-out cohort")
    _add_cohort_args(p, default_seed=2, default_patients=200)
    p.add_argument("--models", type=Path, default=Path("models"), help="folder of trained models (default models)")
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="report folder (report.md, PNGs)")
    p.add_argument("--update-cards", action="store_true", help="write the metrics into each model's MODEL_CARD.md")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from rtqa_node.ml.dataset import simulate_cohort
    from rtqa_node.ml.evaluate import describe_cohorts, evaluate, markdown
    from rtqa_node.ml.train import WEIGHTS_NAME, TrainedModel

    folders = sorted(p.parent for p in args.models.glob(f"*/{WEIGHTS_NAME}"))
    if not folders:
        raise InputError(f"no trained models (*/{WEIGHTS_NAME}) in {args.models}; run `rtqa train` first")
    models = [TrainedModel.load(f) for f in folders]
    data = models[0].record.get("data", {})
    if data.get("source") != "synthetic":
        raise InputError("the baselines are fitted on the models' training cohort, which must be synthetic here")
    if args.data is None and args.seed == data["seed"] and args.first < data.get("first", 0) + data["patients"]:
        raise InputError(f"the test patients overlap the training cohort (seed {args.seed}, patients "
                         f"{data.get('first', 0)}-{data.get('first', 0) + data['patients'] - 1}): use another seed "
                         f"or --first {data.get('first', 0) + data['patients']}")
    train_cohort = simulate_cohort(patients=data["patients"], seed=data["seed"], sites=data["sites"],
                                   first=data.get("first", 0), cache_dir=args.cache, jobs=args.jobs)
    test, test_data = _cohort(args)
    result = evaluate(models, train_cohort, test, out_dir=args.out, description=describe_cohorts(data, test_data))
    if args.update_cards:
        from rtqa_node.ml.train import write_model_card

        rows = {r["model"]: r for r in result.rows}
        for model, folder in zip(models, folders):
            write_model_card(model, folder, rows.get(model.name))
    if args.json:
        print_json(result.to_json())
    else:
        sys.stdout.write(markdown(result))
    return 0


COMMANDS += [_add_train, _add_evaluate]


# -- review ------------------------------------------------------------------------------------------------


def _add_review(sub) -> None:
    p = sub.add_parser("review", help="review a plan study: integrity, trial protocol, contours (verdict + findings)")
    p.add_argument("path", help="folder of DICOM files (searched recursively), one file, or a stored plan study id")
    p.add_argument("--protocol", help="trial protocol id (see rtqa_node/checks/protocols) or a protocol YAML file; "
                   "default: the configured one, else chosen from the plan's Clinical Trial Protocol ID or label")
    p.add_argument("--reference", type=Path, help="a second RTSTRUCT (file or folder) to compare the contours with")
    p.add_argument("--model", help="trained model for the predictions and the risk map (a folder under models/ "
                   "or a path; 'none': rule-based review only); default: the configured review_model (fused)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout (Review.to_json())")
    p.add_argument("--out", type=Path, help="also write review.json (and the node's outputs) into this folder")
    p.add_argument("--verdict-exit-code", action="store_true",
                   help="exit with the verdict instead of 0: 0 per protocol, 3 minor, 4 major, 5 not evaluable "
                   "(for scripts and CI gates; 1 and 2 keep their meaning)")
    _add_data_dir(p)
    p.set_defaults(run=_run_review)


#: ``rtqa review --verdict-exit-code``: an extension of the contract's "0 whatever the verdict".
VERDICT_EXIT_CODES = {"per_protocol": 0, "minor": 3, "major": 4, "not_evaluable": 5}


def _review_files(args: argparse.Namespace) -> tuple[list[Path], str | None, int]:
    """Files of PATH: a folder or file, else a stored plan study id (its latest revision in the index)."""
    from rtqa_node.rt.plan_study import dicom_files

    path = Path(args.path)
    if path.exists():
        return ([path] if path.is_file() else dicom_files(path)), None, 1
    if not args.path.startswith("ps-"):
        raise InputError(f"{args.path}: no such file or folder, and not a plan study id (ps-...)")
    settings = _settings(args)
    if not settings.index_path.exists():
        raise InputError(f"{args.path}: not a folder, and no node data in {settings.data_dir} to look it up in")
    from rtqa_node.store.index import Index

    index = Index(settings.index_path)
    try:
        rows = index.query("SELECT MAX(revision) FROM plan_study_members WHERE plan_study_id = ?", (args.path,))
        revision = rows[0][0] if rows else None
        if revision is None:
            raise InputError(f"plan study {args.path} has no ready revision in {settings.data_dir}")
        members = index.query(
            "SELECT i.path FROM plan_study_members m JOIN instances i ON i.id = m.instance_id"
            " WHERE m.plan_study_id = ? AND m.revision = ? ORDER BY m.role, i.id", (args.path, revision))
    finally:
        index.close()
    return [settings.data_dir / r[0] for r in members], args.path, int(revision)


def _run_review(args: argparse.Namespace) -> int:
    from rtqa_node.checks.pipeline import choose_protocol, format_review, review_plan_study
    from rtqa_node.rt.plan_study import load_folder, load_plan_study

    files, plan_study_id, revision = _review_files(args)
    if not files:
        raise InputError(f"{args.path}: no files")
    study = load_plan_study(files)
    selection = choose_protocol(study, explicit=args.protocol, configured=_settings(args).review_protocol)
    reference = None
    if args.reference is not None:
        ref_study = load_folder(args.reference)
        if not ref_study.structure_sets:
            raise InputError(f"--reference {args.reference}: no RTSTRUCT found")
        reference = ref_study.structure_sets[0]
    review = review_plan_study(study, protocol=selection.protocol, reference_structures=reference)
    model = _settings(args, review_model=args.model).review_model
    if model is not None:
        from rtqa_node.ml.inference import add_predictions

        review = add_predictions(review, files, model=model)
    document = review.to_json()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "review.json").write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        # the SR, risk maps and PDF the node would send (issue 8, rtqa_node/report/outputs.py)
        from rtqa_node.report.outputs import write_review_outputs

        if plan_study_id is None:  # a folder: an id from the plan's UID, hashed like assemble's ids
            import hashlib

            key = study.plans[0].sop_instance_uid if study.plans else str(Path(args.path).resolve())
            plan_study_id = "ps-" + hashlib.sha256(f"folder/{key}".encode()).hexdigest()[:12]
        write_review_outputs(review, study, args.out, plan_study_id=plan_study_id, revision=revision)
    if args.json:
        print_json(document)
    else:
        sys.stdout.write(format_review(review))
    return VERDICT_EXIT_CODES[review.verdict.value] if args.verdict_exit_code else 0


COMMANDS.append(_add_review)


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
