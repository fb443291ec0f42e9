"""Fine-tune TrOCR on your handwriting lines and compare it with the base model.

python train.py                                  # the defaults in conf/train.yaml
python train.py trainer.max_epochs=4 optim.lr=1e-5
python train.py -m optim.lr=1e-5,3e-5 data.batch_size=2,4   # a sweep
python train.py experiment=quickstart            # offline, on the shipped sample
"""

from hwr.settings import hydra_entry

main = hydra_entry("train", "hwr.training:train")

if __name__ == "__main__":
    main()
