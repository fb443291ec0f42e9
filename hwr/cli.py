"""One command line for the tools: `python -m hwr <verb>` (or `hwr <verb>`).

hwr import-xml PAGES_DIR --out OUT_DIR      ALTO / PAGE XML + page images -> line CSV
hwr import-unipen UNIPEN_DIR --out OUT_DIR  UNIPEN pen trajectories -> line images + CSV
hwr segment PAGE_IMAGE... --out OUT_DIR     pages -> line images + CSV to fill in (learned finder)
hwr train-finder data.pages=[DIR,...]       train the learned line finder (Hydra overrides)
hwr label LINES_CSV [--model M] [--port N]  a local page to type or correct lines
hwr predict model=embedded inputs=P         read images (Hydra overrides, as predict.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hwr.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hwr", description="Read your own handwriting: tools from page to model."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("import-xml", help="ALTO / PAGE XML with page images -> line CSV")
    p.add_argument(
        "pages", type=Path, nargs="+", help="folders of XML files (searched recursively)"
    )
    p.add_argument("--out", type=Path, required=True, help="folder for lines.csv and images/")
    p.add_argument("--max-height", type=int, help="scale taller lines down to this many pixels")

    p = verbs.add_parser("import-unipen", help="UNIPEN pen trajectories -> line CSV")
    p.add_argument("root", type=Path, help="a clone of train_r01_v07 (data/, include/)")
    p.add_argument("--out", type=Path, required=True, help="folder for lines.csv and images/")
    p.add_argument("--seed", type=int, default=0, help="the drawn lines' pens and papers")

    p = verbs.add_parser("segment", help="page images -> line images + CSV with empty text")
    p.add_argument("images", type=Path, nargs="+", help="page images")
    p.add_argument("--out", type=Path, required=True, help="folder for lines.csv and images/")
    p.add_argument(
        "--finder", metavar="FOLDER", help="the learned line finder to cut with (default: shipped)"
    )
    p.add_argument(
        "--classical",
        action="store_true",
        help="cut with the classical segmenter (projection profiles) instead",
    )

    p = verbs.add_parser("label", help="serve a local page to type or correct the lines")
    p.add_argument("csv", type=Path, help="the line CSV; accepted lines are saved into it")
    p.add_argument(
        "--model",
        help="pre-fill with this model's reading: hub id, folder, embedded, or tuned (the "
        "newest model train.py tuned on this CSV, under ./outputs)",
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")

    verbs.add_parser(
        "predict",
        help="read images with a model (Hydra overrides; see predict.py)",
        add_help=False,
    )
    verbs.add_parser(
        "train-finder",
        help="train the learned line finder on pages with XML (Hydra overrides; conf/finder.yaml)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    hydra_verbs = {
        "predict": ("predict", "hwr.prediction:predict"),
        "train-finder": ("finder", "hwr.pages.finder:train"),
    }
    if argv[:1] and argv[0] in hydra_verbs:
        from hwr.settings import hydra_entry

        sys.argv = [f"hwr {argv[0]}", *argv[1:]]
        hydra_entry(*hydra_verbs[argv[0]])()
        return
    args = _parser().parse_args(argv)
    try:
        run(args)
    except UserError as e:  # a mistake the user can fix: the message, no traceback
        print(f"hwr {args.verb}: {e}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> None:
    if args.verb == "import-xml":
        from hwr.pages.xml_import import import_pages

        xmls = sorted(x for folder in args.pages for x in folder.rglob("*.xml"))
        if not xmls:
            folders = ", ".join(map(str, args.pages))
            raise SystemExit(f"hwr import-xml: no .xml files under {folders}")
        import_pages(xmls, args.out, max_height=args.max_height)
    elif args.verb == "import-unipen":
        from hwr.embedded.unipen import import_unipen

        import_unipen(args.root, args.out, seed=args.seed)
    elif args.verb == "segment":
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from hwr.pages.segment import segment_pages
        from hwr.settings import CONF

        if args.classical and args.finder:
            raise UserError("--finder names a learned line finder: leave out --classical")
        # the same segmenter configs as predict.py's segmenter=classical|learned
        name = "classical" if args.classical else "learned"
        cfg = OmegaConf.load(CONF / "segmenter" / f"{name}.yaml")
        if args.finder:
            cfg.path = args.finder
        segment_pages(args.images, args.out, instantiate(cfg))
    elif args.verb == "label":
        from hwr.machine import share_cores

        share_cores()  # before torch loads: the page reads lines beside other hwr processes
        from hwr.pages.label import serve

        serve(args.csv, model=args.model, port=args.port, open_browser=not args.no_browser)


if __name__ == "__main__":
    main()
