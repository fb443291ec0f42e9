"""Read new images with a model: line images, folders of them, or whole pages.

    python predict.py model=embedded inputs=path/to/img_or_folder
    python predict.py model.name_or_path=outputs/train/<run>/model inputs=path/to/img_or_folder

The same as `python -m hwr predict ...`; see hwr/prediction.py.
"""

from hwr.settings import hydra_entry

main = hydra_entry("predict", "hwr.prediction:predict")

if __name__ == "__main__":
    main()
