"""``imagetok-compare`` / ``python compare.py tokenizers=[dirA,dirB] [names=[a,b]] [data=...]`` (see README)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imagetok.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../configs", config_name="compare")
def main(cfg: DictConfig) -> None:
    from imagetok.evaluation.compare import compare

    with exit_on_user_error():
        compare(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
