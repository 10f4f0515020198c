"""``imagetok-evaluate`` / ``python evaluate.py checkpoint=<ckpt or dir> [data=...] [eval.num_images=N]`` (see README)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from imagetok.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from imagetok.evaluation.run import evaluate

    with exit_on_user_error():
        evaluate(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
