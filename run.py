"""latentmap's entry point: ``python run.py [overrides]``, or ``python run.py -m ...`` for a sweep
(installed as ``latentmap``; the command itself is ``latentmap.commands.run``)."""

from latentmap.commands.run import main

if __name__ == "__main__":
    main()
