"""``imagetok-train`` / ``python train.py [group=option ...] [key=value ...]``: train a tokenizer (see README)."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imagetok.errors import exit_on_user_error


def _defaults(hydra_cfg) -> DictConfig | None:
    """This command's config without its overrides: what a resumed run compares against to tell the
    settings the user changed from those that come from the checkpoint (None where Hydra's config
    loader is not at hand: then this command's config wins in full, as through the Python API)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return None
    return compose(config_name=hydra_cfg.job.config_name, overrides=[])


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    # Imported here so that `--help` and config errors do not wait for torch and Lightning.
    from imagetok.training.cluster import log_file_on_rank_zero_only, prepare_job
    from imagetok.training.run import train

    from lightning.pytorch.utilities import rank_zero_only

    from imagetok.utils.console import quiet_console

    hydra_cfg = HydraConfig.get()
    log_file_on_rank_zero_only()
    quiet_console(rank_zero_only.rank)
    with exit_on_user_error():
        try:
            resume = prepare_job(cfg, hydra_cfg)
            train(cfg, hydra_cfg.runtime.output_dir, defaults=_defaults(hydra_cfg) if resume else None)
        except FloatingPointError as err:  # optim.nonfinite: the loss diverged; no checkpoint was touched
            logging.getLogger("imagetok").error("training stopped: %s", err)
            sys.exit(3)


if __name__ == "__main__":
    main()
