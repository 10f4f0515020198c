"""Train a tokenizer: ``python train.py [group=option ...] [key=value ...]`` (see README)."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imagetok.data.imagefolder import ImageLoadError
from imagetok.errors import ConfigValueError, MissingWeightsError
from imagetok.training.run import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigValueError, MissingWeightsError, ImageLoadError) as err:
        logging.getLogger("imagetok").error("error: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
