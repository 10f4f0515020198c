"""Train a tokenizer: ``python train.py [group=option ...] [key=value ...]`` (see README)."""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from imagetok.errors import USER_ERRORS
from imagetok.training.cluster import check_sweep_job, log_file_on_rank_zero_only, resume_setting
from imagetok.training.run import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    log_file_on_rank_zero_only()
    try:
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        if sweep:
            check_sweep_job(cfg.trainer)
        # A job requeued by SLURM reruns its original overrides and continues from its last checkpoint;
        # resume=last in a sweep job looks in this job's own directory only (see resume_setting).
        resume, search_dir = resume_setting(cfg.resume, cfg.resume_search_dir, hydra_cfg.runtime.output_dir, sweep)
        if resume != cfg.resume:
            logging.getLogger("imagetok").info("requeued by SLURM (restart %s): resume=last",
                                               os.environ.get("SLURM_RESTART_COUNT"))
        cfg.resume, cfg.resume_search_dir = resume, search_dir
        train(cfg, hydra_cfg.runtime.output_dir)
    except USER_ERRORS as err:
        logging.getLogger("imagetok").error("error: %s", err)
        sys.exit(2)
    except FloatingPointError as err:  # optim.nonfinite: the loss diverged; no checkpoint was touched
        logging.getLogger("imagetok").error("training stopped: %s", err)
        sys.exit(3)


if __name__ == "__main__":
    main()
