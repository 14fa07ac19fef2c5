"""Two models block by block. See ``latentmap.commands.similarity`` (``latentmap-similarity``)."""

from latentmap.commands.similarity import *  # noqa: F403 - the command's names, for code that imports this script
from latentmap.commands.similarity import cli

if __name__ == "__main__":
    cli()
