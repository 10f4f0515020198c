"""Export a trained tokenizer: ``python export.py checkpoint=<last.ckpt> out=<dir> [weights=raw] [serving=true]``."""


import hydra
from omegaconf import DictConfig

from imagetok.errors import exit_on_user_error
from imagetok.export.run import export


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        export(cfg)


if __name__ == "__main__":
    main()
