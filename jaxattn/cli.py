"""The ``jaxattn`` command."""

from __future__ import annotations

import argparse
import sys


def _tour(args) -> int:
    from jaxattn.tour import run_tour

    run_tour(args.text, out=args.out, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxattn", description="Transformer attention from first principles, in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    tour = commands.add_parser("tour", help="walk a sentence through attention, step by step")
    tour.add_argument("--text", default="The next day is bright", help="the sentence to walk through")
    tour.add_argument("--out", default="jaxattn-tour", help="folder for the figures (default: ./jaxattn-tour)")
    tour.add_argument("--seed", type=int, default=0, help="seed of the random embeddings and projections")
    tour.set_defaults(run=_tour)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"jaxattn {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
