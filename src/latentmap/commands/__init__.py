"""latentmap's commands, installed with the package (``[project.scripts]`` in pyproject.toml) and
run by the thin shims ``run.py`` and ``scripts/*.py``:

* ``latentmap`` (``run.py``): a mapping run or a sweep (:mod:`~latentmap.commands.run`);
* ``latentmap-compare``: is run A better than run B (:mod:`~latentmap.commands.compare`);
* ``latentmap-report``: the study report of any runs (:mod:`~latentmap.commands.report`);
* ``latentmap-similarity``: two models block by block (:mod:`~latentmap.commands.similarity`);
* ``latentmap-finetune``: fine-tune a backbone (:mod:`~latentmap.commands.finetune`);
* ``latentmap-export``: the TensorBoard projector or a parquet (:mod:`~latentmap.commands.export`);
* ``latentmap-neighbours``: any image's neighbours (:mod:`~latentmap.commands.neighbours`);
* ``latentmap-runs``: clean up runs left RUNNING (:mod:`~latentmap.commands.runs`).
"""
