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

__all__ = ["HelpFormatter", "main"]

COVARIANCE_TYPES = ["full", "diag", "spherical", "tied"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default to show: not for required options, nor None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, argparse.SUPPRESS, []):
            return action.help
        return super()._get_help_string(action)


def _components(text: str) -> str:
    """argparse type of `fit --n-components`: checked here, so a bad value stops before anything is written."""
    from streamem.report import parse_components

    try:
        parse_components(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _na_values(text: str) -> list[str]:
    return [value for value in text.split(",") if value]


def _add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The data arguments `fit` and `check` share."""
    parser.add_argument("data", help="CSV file with a header row")
    parser.add_argument(
        "--model",
        default="gmm",
        choices=["gmm", "hmm"],
        help="gmm: a mixture (each row on its own); hmm: a hidden Markov model, the rows in file order one sequence "
        "whose regimes persist (with --target: a Markov-switching regression)",
    )
    parser.add_argument(
        "--covariance-type",
        "--covariance",
        dest="covariance",
        default="full",
        choices=COVARIANCE_TYPES,
        help="covariance of each component",
    )
    parser.add_argument("--columns", help="feature columns, comma-separated (default: every numeric column)")
    parser.add_argument(
        "--missing",
        default="error",
        choices=["error", "marginalize"],
        help="what a missing cell (empty, NA, NaN or one of --na-values) is: an error, or a value integrated out",
    )
    parser.add_argument(
        "--na-values",
        type=_na_values,
        default=[],
        metavar="TEXT[,TEXT]",
        help="more cell texts that mean a missing value, e.g. '?' (any other text in a number column is an error)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the EM starts")


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
        "numeric columns; with --model hmm, a hidden Markov model (or a Markov-switching regression) of its rows "
        "in file order. Writes OUT/model.json (for a mixture also a warm start for the online models: "
        "OnlineGMM.from_fit), OUT/figures/*.png and OUT/report.md.",
        formatter_class=HelpFormatter,
    )
    fit.add_argument("--out", required=True, help="output directory")
    fit.add_argument(
        "--n-components",
        "--components",
        dest="components",
        type=_components,
        default="auto",
        metavar="K",
        help="K (states with --model hmm), a range A-B like 1-6 (lowest BIC), or 'auto' (1-8)",
    )
    fit.add_argument("--target", help="a column: fit a mixture of linear regressions of it on the others")
    _add_table_arguments(fit)
    fit.add_argument("--n-init", type=_positive_int, default=3, help="EM starts per K")
    fit.set_defaults(handler=_fit, log_level="WARNING")


def _fit(args) -> int:
    from streamem.hmm_report import fit_hmm_table
    from streamem.report import MissingExtra, fit_table

    fit = fit_hmm_table if args.model == "hmm" else fit_table
    try:
        document = fit(
            args.data,
            args.out,
            components=args.components,
            covariance_type=args.covariance,
            target=args.target,
            columns=args.columns.split(",") if args.columns else None,
            missing=args.missing,
            na_values=args.na_values,
            n_init=args.n_init,
            seed=args.seed,
        )
    except (ValueError, OSError, MissingExtra) as error:  # OSError: a file or --out that cannot be read or written
        print(f"streamem fit: {error}", file=sys.stderr)
        return 2
    if args.model == "hmm":
        durations = ", ".join("inf" if d is None else f"{d:.3g}" for d in document["expected_durations"])
        print(
            f"{document['n_states']} states, log-likelihood per record {document['log_likelihood']:.4f}, "
            f"BIC {document['bic']:.1f}, expected durations {durations} records; "
            f"wrote {args.out}/model.json, {args.out}/report.md and {args.out}/figures/"
        )
        return 0
    print(
        f"{document['n_components']} components, log-likelihood per record {document['log_likelihood']:.4f}, "
        f"BIC {document['bic']:.1f}; wrote {args.out}/model.json, {args.out}/report.md and {args.out}/figures/"
    )
    return 0


def _register_check(commands) -> None:
    check = commands.add_parser(
        "check",
        help="run the online model over a CSV file as a stream and compare it with batch EM",
        description="Feed a CSV file's rows, in file order, to the online model (OnlineGMM) as a stream, fit batch "
        "EM to the whole file, and print how far apart they are: components matched, largest weight, mean and "
        "covariance gaps, log-likelihood gap per record. With --model hmm: OnlineGaussianHMM against batch "
        "Baum-Welch (transition, mean and covariance gaps) and regime switches per 1,000 records of the online "
        "filter against OnlineGMM's labels on the same rows.",
        formatter_class=HelpFormatter,
    )
    check.add_argument(
        "--n-components",
        "--components",
        dest="components",
        type=_positive_int,
        default=2,
        metavar="K",
        help="K (states with --model hmm)",
    )
    _add_table_arguments(check)
    check.add_argument("--batch-size", type=_positive_int, default=64, help="records per stepwise-EM update")
    check.add_argument("--passes", type=_positive_int, default=1, help="times the file is replayed as a stream")
    check.add_argument("--out", help="directory for the online model's figure (weights and means over time)")
    check.set_defaults(handler=_check, log_level="WARNING")


def _check(args) -> int:
    from streamem.hmm_report import check_hmm_table
    from streamem.report import MissingExtra, check_table

    check = check_hmm_table if args.model == "hmm" else check_table
    try:
        report = check(
            args.data,
            components=args.components,
            covariance_type=args.covariance,
            columns=args.columns.split(",") if args.columns else None,
            batch_size=args.batch_size,
            passes=args.passes,
            seed=args.seed,
            out_dir=args.out,
            missing=args.missing,
            na_values=args.na_values,
        )
    except (ValueError, OSError, MissingExtra) as error:
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
