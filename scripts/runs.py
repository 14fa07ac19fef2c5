"""Clean up runs left RUNNING. See ``latentmap.commands.runs`` (installed as ``latentmap-runs``)."""

from latentmap.commands.runs import *  # noqa: F403 - the command's names, for code that imports this script
from latentmap.commands.runs import cli

if __name__ == "__main__":
    cli()
