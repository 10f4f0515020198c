"""Export a trained tokenizer: ``python export.py checkpoint=<last.ckpt> out=<dir> [weights=raw] [serving=true]``."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from imagetok.errors import ConfigValueError
from imagetok.export.run import export


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except (ConfigValueError, FileNotFoundError, ValueError) as err:
        logging.getLogger("imagetok").error("error: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
