"""Fine-tune a backbone with a linear head (see conf/finetune.yaml for every setting).

    python scripts/finetune.py model=mobilenet_v2 dataset=imagefolder dataset.path=<dir> epochs=2
    python scripts/finetune.py model=hf model.name=<dir> dataset=digits frozen_layers=4 optimizer.lr=3e-5

Each epoch logs train_loss, train_acc and heldout_acc to the run. The backbone is saved to
outputs/checkpoints/<name>/ in its own format; `model=hf model.name=<that dir>` (transformers)
or the `reload` tag's timm config loads it, and `experiment=finetune_study finetuned=<dir>`
compares it with its base.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from latentmap.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    from latentmap.finetune import finetune
    from latentmap.task import execute

    return execute(finetune, cfg, "heldout_acc")


def cli() -> None:
    """The installed ``latentmap-finetune`` command (and ``python scripts/finetune.py``)."""
    from latentmap.config import hydra_command

    hydra_command(main, "finetune", "scripts/finetune.py")


if __name__ == "__main__":
    cli()
