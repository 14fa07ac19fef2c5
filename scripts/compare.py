"""Is run A better than run B? See ``latentmap.commands.compare`` (installed as ``latentmap-compare``)."""

from latentmap.commands.compare import *  # noqa: F403 - the command's names, for code that imports this script
from latentmap.commands.compare import cli

if __name__ == "__main__":
    cli()
