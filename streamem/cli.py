"""The `streamem` command line.

Library commands live here; commands that need Kafka (`run`, `demo`) are
registered by the connectors package through the `streamem.commands` entry-point
group, so this module never imports `connectors` (imports point down the layers).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from streamem import __version__

    parser = argparse.ArgumentParser(prog="streamem", description="Online EM for Gaussian and regression mixtures.")
    parser.add_argument("--version", action="version", version=f"streamem {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_fit(commands)
    _register_check(commands)
    for entry in sorted(entry_points(group="streamem.commands"), key=lambda e: e.name):
        register = entry.load()
        register(commands)
    return parser


def _register_fit(commands) -> None:
    fit = commands.add_parser(
        "fit",
        help="fit the batch core to a CSV file: parameters as JSON, figures, a report",
        description="Fit a Gaussian mixture (or, with --target, a mixture of linear regressions) to a CSV file's "
        "numeric columns. Writes OUT/model.json (also a warm start for the online models: "
        "OnlineGMM.from_fit), OUT/figures/*.png and OUT/report.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fit.add_argument("data", help="CSV file with a header row")
    fit.add_argument("--out", required=True, help="output directory")
    fit.add_argument("--components", default="auto", help="K, a range like 1-6, or 'auto' (1-8, lowest BIC)")
    fit.add_argument("--covariance", default="full", choices=["full", "diag", "spherical", "tied"])
    fit.add_argument("--target", help="a column: fit a mixture of linear regressions of it on the others")
    fit.add_argument("--columns", help="feature columns, comma-separated (default: every numeric column)")
    fit.add_argument(
        "--missing",
        default="error",
        choices=["error", "marginalize"],
        help="what an empty cell is: an error, or a missing value integrated out",
    )
    fit.add_argument("--n-init", type=int, default=3, help="EM starts per K")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(handler=_fit, log_level="WARNING")


def _fit(args) -> int:
    from streamem.report import fit_table

    try:
        document = fit_table(
            args.data,
            args.out,
            components=args.components,
            covariance_type=args.covariance,
            target=args.target,
            columns=args.columns.split(",") if args.columns else None,
            missing=args.missing,
            n_init=args.n_init,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"streamem fit: {error}", file=sys.stderr)
        return 2
    print(
        f"{document['n_components']} components, log-likelihood per record {document['log_likelihood']:.4f}, "
        f"BIC {document['bic']:.1f}; wrote {args.out}/model.json, {args.out}/report.md and {args.out}/figures/"
    )
    return 0


def _register_check(commands) -> None:
    check = commands.add_parser(
        "check",
        help="run the online model over a CSV file as a stream and compare it with batch EM",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    check.add_argument("data", help="CSV file with a header row")
    check.add_argument("--components", type=int, default=2)
    check.add_argument("--covariance", default="full", choices=["full", "diag", "spherical", "tied"])
    check.add_argument("--columns", help="feature columns, comma-separated (default: every numeric column)")
    check.add_argument("--batch-size", type=int, default=64)
    check.add_argument("--passes", type=int, default=1, help="times the file is replayed as a stream")
    check.add_argument("--missing", default="error", choices=["error", "marginalize"])
    check.add_argument("--out", help="directory for the online model's figure (weights and means over time)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(handler=_check, log_level="WARNING")


def _check(args) -> int:
    from streamem.report import check_table

    try:
        report = check_table(
            args.data,
            components=args.components,
            covariance_type=args.covariance,
            columns=args.columns.split(",") if args.columns else None,
            batch_size=args.batch_size,
            passes=args.passes,
            seed=args.seed,
            out_dir=args.out,
            missing=args.missing,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"streamem check: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(args, "log_level", None) or "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
