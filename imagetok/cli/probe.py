"""``imagetok-probe`` / ``python probe.py tokens=<dir> val_tokens=<dir> [key=value ...]``: train the AR probe
on token shards and report how generatable the tokens are (see README, "AR probe")."""


import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imagetok.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../configs", config_name="probe")
def main(cfg: DictConfig) -> None:
    # Imported here so that `--help` and config errors do not wait for torch and Lightning.
    from lightning.pytorch.utilities import rank_zero_only

    from imagetok.probe.run import probe
    from imagetok.training.cluster import log_file_on_rank_zero_only, prepare_job
    from imagetok.utils.console import quiet_console

    hydra_cfg = HydraConfig.get()
    log_file_on_rank_zero_only()
    quiet_console(rank_zero_only.rank)
    with exit_on_user_error():
        _ = cfg.tokens, cfg.val_tokens  # a missing required value fails here, in one line
        prepare_job(cfg, hydra_cfg)
        probe(cfg, hydra_cfg.runtime.output_dir)


if __name__ == "__main__":
    main()
