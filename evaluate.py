"""Score one or more models on a line CSV and compare them.

    python evaluate.py data.csv=some/lines.csv \
        models.base=microsoft/trocr-base-handwritten models.tuned=outputs/train/.../model
"""

import logging
import re
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hwr.evaluation import evaluate  # after Hydra, so --help and config errors come fast

    # Lightning prints through a handler of its own; Hydra's root handlers already do.
    logging.getLogger("lightning").handlers.clear()

    evaluate(cfg)


if __name__ == "__main__":
    # models.NAME=... adds a model; Hydra would want +models.NAME=..., so add the + here.
    sys.argv = [re.sub(r"^models\.", "+models.", a) for a in sys.argv]
    main()
