"""``imagetok-export`` / ``python export.py checkpoint=<last.ckpt> out=<dir> [weights=raw] [serving=true]`` (see README)."""

import hydra
from omegaconf import DictConfig

from imagetok.errors import exit_on_user_error


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    from imagetok.export.run import export

    with exit_on_user_error():
        export(cfg)


if __name__ == "__main__":
    main()
