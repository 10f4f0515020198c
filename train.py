"""Train a tokenizer: ``python train.py [group=option ...] [key=value ...]`` (see README)."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from imagetok.data.imagefolder import ImageLoadError
from imagetok.errors import ConfigValueError, MissingWeightsError
from imagetok.training.cluster import check_sweep_job, log_file_on_rank_zero_only, requeued_by_slurm
from imagetok.training.run import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    log_file_on_rank_zero_only()
    try:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            check_sweep_job(cfg.trainer)
            if cfg.resume is None and requeued_by_slurm():
                cfg.resume = "last"  # a requeued job reruns its original overrides; it must not start over
            # resume=last in a sweep continues this job alone (a requeued SLURM job reruns in its own
            # directory), never the newest checkpoint of some other run
            if cfg.resume == "last":
                cfg.resume_search_dir = hydra_cfg.runtime.output_dir
        train(cfg, hydra_cfg.runtime.output_dir)
    except (ConfigValueError, MissingWeightsError, ImageLoadError) as err:
        logging.getLogger("imagetok").error("error: %s", err)
        sys.exit(2)
    except FloatingPointError as err:  # optim.nonfinite: the loss diverged; no checkpoint was touched
        logging.getLogger("imagetok").error("training stopped: %s", err)
        sys.exit(3)


if __name__ == "__main__":
    main()
