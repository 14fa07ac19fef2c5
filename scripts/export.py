"""Export a run (TensorBoard projector, parquet). See ``latentmap.commands.export`` (``latentmap-export``)."""

from latentmap.commands.export import *  # noqa: F403 - the command's names, for code that imports this script
from latentmap.commands.export import cli

if __name__ == "__main__":
    cli()
