"""Fine-tune a backbone. See ``latentmap.commands.finetune`` (installed as ``latentmap-finetune``)."""

from latentmap.commands.finetune import *  # noqa: F403 - the command's names, for code that imports this script
from latentmap.commands.finetune import cli

if __name__ == "__main__":
    cli()
