"""Evaluate a tokenizer: ``python evaluate.py checkpoint=<ckpt or dir> [data=...] [eval.num_images=N]`` (see README)."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imagetok.data.imagefolder import ImageLoadError
from imagetok.errors import ConfigValueError, MissingWeightsError
from imagetok.evaluation.run import evaluate


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigValueError, MissingWeightsError, ImageLoadError, FileNotFoundError) as err:
        logging.getLogger("imagetok").error("error: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    main()
