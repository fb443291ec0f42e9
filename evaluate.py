"""Score one or more models on a line CSV and compare them.

    python evaluate.py data.csv=some/lines.csv \
        models.base=microsoft/trocr-base-handwritten models.tuned=outputs/train/.../model
"""

import re
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # Imported after Hydra, so --help and config errors come fast.
    from hwr.errors import hydra_task
    from hwr.evaluation import evaluate

    hydra_task(evaluate)(cfg)


if __name__ == "__main__":
    # models.NAME=... adds a model; Hydra would want +models.NAME=..., so add the + here.
    sys.argv = [re.sub(r"^models\.", "+models.", a) for a in sys.argv]
    main()
