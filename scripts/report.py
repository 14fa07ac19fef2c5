"""The study report of any runs. See ``latentmap.commands.report`` (installed as ``latentmap-report``)."""

from latentmap.commands.report import *  # noqa: F403 - the command's names, for code that imports this script
from latentmap.commands.report import cli

if __name__ == "__main__":
    cli()
