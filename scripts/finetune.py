"""Fine-tune a backbone with a linear head (see conf/finetune.yaml for every setting).

    python scripts/finetune.py model=mobilenet_v2 dataset=imagefolder dataset.path=<dir> epochs=2
    python scripts/finetune.py model=hf model.name=<dir> dataset=digits frozen_layers=4 optimizer.lr=3e-5

Each epoch logs train_loss, train_acc and heldout_acc to the run. The backbone is saved to
outputs/checkpoints/<name>/ in its own format; `model=hf model.name=<that dir>` (transformers)
or the `reload` tag's timm config loads it, and `experiment=finetune_study finetuned=<dir>`
compares it with its base.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    from latentmap.finetune import finetune
    from latentmap.task import execute

    return execute(finetune, cfg, "heldout_acc")


if __name__ == "__main__":
    import sys

    from latentmap.config import refuse_unknown_keys

    refuse_unknown_keys(sys.argv[1:], Path(__file__).resolve().parent.parent / "conf", "finetune",
                        "scripts/finetune.py")
    main()
