"""Fine-tune TrOCR on your handwriting lines and compare it with the base model.

python train.py                                  # the defaults in conf/train.yaml
python train.py trainer.max_epochs=4 optim.lr=1e-5
python train.py -m optim.lr=1e-5,3e-5 data.batch_size=2,4   # a sweep
python train.py experiment=quickstart            # offline, on the shipped sample
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # Imported after Hydra, so --help and config errors come fast.
    from hwr.errors import hydra_task
    from hwr.training import train

    return hydra_task(train)(cfg)


if __name__ == "__main__":
    main()
