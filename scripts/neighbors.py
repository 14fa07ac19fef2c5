"""Any image's nearest neighbours as a PNG. See ``latentmap.commands.neighbours`` (``latentmap-neighbours``)."""

from latentmap.commands.neighbours import *  # noqa: F403 - the command's names, for code that imports this script
from latentmap.commands.neighbours import cli

if __name__ == "__main__":
    cli()
