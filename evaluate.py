"""Score one or more models on a line CSV and compare them.

    python evaluate.py data.csv=some/lines.csv model=embedded
    python evaluate.py data.csv=some/lines.csv \
        models.base=microsoft/trocr-base-handwritten models.tuned=outputs/train/.../model
"""

import re
import sys

from hwr.settings import hydra_entry

main = hydra_entry("evaluate", "hwr.evaluation:evaluate")

if __name__ == "__main__":
    # models.NAME=... adds a model; Hydra would want +models.NAME=..., so add the + here.
    sys.argv = [re.sub(r"^models\.", "+models.", a) for a in sys.argv]
    main()
