"""The config edge: command lines checked for unknown keys, instantiating a `_target_` node, and a job's folders.

Every entry point (``run.py``, ``scripts/finetune.py``, ``scripts/similarity.py``, the fine-tuning
study) uses these; the rule of each setting is in :mod:`latentmap.settings`, so a bad value reads
the same everywhere: one line naming the key, the bad value and the fix.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from latentmap.errors import ConfigError
from latentmap.settings import CONF_DIR, SETTINGS, output_beside_images  # conf/: beside the settings' table


def output_dirs(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(artifact folder, Hydra's .hydra folder) of this job; outside Hydra, a timestamped folder
    under ``output_dir`` and no .hydra folder."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        return job_dir / "artifacts", job_dir / ".hydra"
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    return Path(cfg.output_dir) / "runs" / stamp / "artifacts", None


def instantiate_node(node: DictConfig, group: str) -> Any:
    """``hydra.utils.instantiate(node)``, with a failure turned into one ConfigError line naming
    the group and its ``_target_``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__ or error
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        # Hydra's "Error loading 'x.Y':" puts the reason on the lines after it: keep them, on one line
        first_line = " ".join(lines[:3]) if lines and lines[0].endswith(":") else (lines or [type(cause).__name__])[0]
        raise ConfigError(f"{group} ({node.get('_target_')}): {first_line}") from error


def _has_path(node: Any, key: str) -> bool:
    """Whether the composed config defines ``key`` (``reducer.n_neighbors``), whatever its value."""
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():  # `in` is False for a ??? value
            return False
        node = node._get_node(part)
    return True


def _paths(node: DictConfig, prefix: str = "") -> list[str]:
    """Every key path of a composed config (``model``, ``model.name``, ...)."""
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        found.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            found += _paths(child, path + ".")
    return found


def check_command_line(argv: list[str], config_dir: Path, config_name: str, script: str) -> None:
    """Refuse, before Hydra composes anything (so before any run or parent run exists), a command
    line key this config does not define, whether added with ``+`` or not (``+reducr=pca``,
    ``reducer.n_neighbours=5``), and a group option that does not exist (``model=vitt``): one
    ConfigError line naming the key and the closest known one. A key inside a group is checked
    against every option the command chooses for that group (``reducer=pca,umap
    reducer.n_neighbors=5`` is refused: PCA has no n_neighbors). ``+`` may add an argument to an
    instantiated node (``+reducer.spread=1.5`` reaches UMAP), never a setting of latentmap's own
    (``+study.kk=3`` is refused). Hydra's own keys, other config names or search paths, and sweeps
    Hydra resolves itself (``glob``) are left to Hydra."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    args, _ = get_args_parser().parse_known_args(argv)
    if GlobalHydra.instance().is_initialized():
        return
    other_configs = args.config_name or args.config_dir or args.config_path
    asks_hydra = args.shell_completion or args.info or args.hydra_help  # Hydra answers these without the choices
    if not other_configs and not asks_hydra:  # a group the config leaves ??? (similarity.py's two models)
        given = {o.split("=", 1)[0].lstrip("+") for o in args.overrides or []}
        for entry in _required_choices(config_dir, config_name):
            if entry not in given:
                group = entry.split("@")[0]
                options = sorted(f.stem for f in (Path(config_dir) / group).glob("*.yaml"))
                raise ConfigError(f"{script} needs {entry}=<option>, one of {', '.join(options)} "
                                  f"(e.g. {entry}={'vit' if 'vit' in options else options[0] if options else '...'})")
    if not args.overrides:
        return
    if other_configs or any(o.lstrip("+~").startswith("hydra.searchpath") for o in args.overrides):
        return  # another config or search path than the one checked here: Hydra's own errors apply
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(args.overrides)
    except HydraException:
        _refuse_unreadable(parser, args.overrides, sweep=bool(args.multirun))
        return  # not one override alone: Hydra's own message says where
    if not Path(config_dir).is_dir():
        raise ConfigError(f"latentmap's configs are not at {config_dir}: the commands read conf/ from the repository, "
                          "so install with `pip install -e .` from a clone")
    groups = {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in Path(config_dir).iterdir()
              if d.is_dir() and d.name != "common"}  # common/: files the options include, not a group
    chosen: dict[str, list[str]] = {}  # group override -> the options the command chooses
    keys = []
    scalars: set[str] = set()  # keys set to one value (not a node, not a sweep)
    folders: dict[str, object] = {}  # output_dir and dataset.path, where the command sets each once
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or "/" in key:
            continue
        if key == "output_dir" and not override.is_delete():  # where Hydra makes its folders before any check
            for value in (list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]):
                _writable_folder(key, getattr(value, "text", value))  # a sweep's quoted item: its text
        if key in ("output_dir", "tracking.uri") and override.is_sweep_override():
            # the sweep's parent run and summary live in one store, which the jobs would not share: the
            # parent went to ./outputs, and the closing line counted 0 of 0 jobs finished
            raise ConfigError(f"{key} cannot vary within a sweep ({override.input_line}): a sweep's jobs and its "
                              f"parent run share one MLflow store; run one sweep for each {key}")
        if override.is_delete() and key in groups:
            listed = _default_groups(config_dir, config_name)  # this config's groups: group -> its default
            if key in listed and listed[key] is not None:
                raise ConfigError(f"{override.input_line or key} deletes the config group {key}, which latentmap "
                                  f"reads: choose one of its options instead ({key}=<option>: "
                                  f"{', '.join(groups[key])})")
            if key not in listed:
                raise ConfigError(f"{override.input_line or key}: {script}'s config has no group {key} to delete")
            continue  # ~experiment: the defaults list leaves it empty anyway
        if key in ("output_dir", "dataset.path") and not override.is_delete() and not override.is_sweep_override():
            folders[key] = override.value()
        if key not in groups or "." in key:
            # A key: checked against the composed config below. One added with + or ++ inside an
            # instantiated node (a `_target_`: the reducer's, model's or dataset's own arguments, e.g.
            # +reducer.spread=1.5) only needs that node; latentmap's own settings are never added.
            keys.append((key, override.input_line or key, override.is_add() or override.is_force_add(),
                         override.is_delete()))
            if not override.is_delete() and not override.is_sweep_override() and not isinstance(override.value(),
                                                                                                  dict):
                scalars.add(key)  # one value (optimizer=sgd): a node there would be replaced by it
            continue
        try:  # a group's options: each value of a choice or range sweep, or the one value
            values = ([str(v) for v in override.sweep_string_iterator()] if override.is_sweep_override()
                      else [str(override.value())])
        except HydraException:  # glob() and other sweeps Hydra resolves itself
            continue
        values = ["null" if v == "None" else v for v in values]
        for value in values:
            if value == "null":  # Hydra's ValueError traceback ("Config group override must be a string")
                raise ConfigError(f"{key}=null is not an option of {key}: choose one ({', '.join(groups[key])}), or "
                                  f"leave {key} out of the command for its default")
            if value not in groups[key]:
                close = difflib.get_close_matches(value, groups[key], n=1, cutoff=0.4)
                raise ConfigError(f"{key}={value} is not an option of {key}"
                                  + (f": the closest is {close[0]}" if close else "")
                                  + f" (options: {', '.join(groups[key])})")
        name = f"{key}@{override.package}" if override.package else key
        chosen[name] = [v for v in values if v != "null"] or ["null"]
    if all(isinstance(folders.get(key), str) and "${" not in folders[key] for key in ("output_dir", "dataset.path")):
        output_beside_images(OmegaConf.create({"output_dir": folders["output_dir"],
                                               "dataset": {"path": folders["dataset.path"]}}))
    if not keys:
        return
    first = [f"{group}={values[0]}" for group, values in chosen.items()]
    variants = [first] + [[f"{group}={value}" if o.startswith(f"{group}=") else o for o in first]
                          for group, values in chosen.items() for value in values[1:]]
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            composed = [(variant, compose(config_name, overrides=variant)) for variant in variants]
    except Exception:  # noqa: BLE001 - a config that does not compose (a missing choice): Hydra says why
        return
    def defines(cfg: DictConfig, key: str, adding: bool) -> bool:
        return (adding and _in_instantiated_node(cfg, key)) or _has_path(cfg, key)  # an added argument, or a key

    for key, text, adding, deleting in keys:
        missing = [variant for variant, cfg in composed if not defines(cfg, key, adding)]
        if not missing and adding and not deleting:
            targets = {k.removesuffix("._target_"): t.split("=", 1)[1] for k, t, _, d in keys
                       if k.endswith("._target_") and not d and "=" in t}  # optimizer._target_=torch.optim.SGD
            for _, cfg in composed:
                _refuse_argument_not_taken(cfg, key, text, targets)
        if not missing:
            if deleting and (key in SETTINGS or not _in_instantiated_node(composed[0][1], key)):
                raise ConfigError(_deleted(composed[0][1], key, text))  # latentmap's own: it reads every one
            node = OmegaConf.select(composed[0][1], key, throw_on_missing=False)
            if key in scalars and isinstance(node, DictConfig) and not adding:  # AttributeError once the task read it
                inner = [str(k) for k in node.keys()]
                if not inner:  # an empty mapping (model.kwargs): keys are added to it
                    raise ConfigError(f"{text} would replace {key}, a mapping, with one value: add a key to it "
                                      f"instead, e.g. +{key}.<name>=<value>")
                example = (f"_target_=<a class; now {node['_target_']}>" if "_target_" in inner
                           else f"{inner[0]}=<value>" if inner else "<key>=<value>")
                raise ConfigError(f"{text} would replace {key}, a section of settings ({', '.join(inner)}), with one "
                                  f"value: set one of its keys instead, e.g. {key}.{example}")
            continue
        cfg = composed[0][1] if len(missing) == len(composed) else next(c for v, c in composed if v in missing)
        known = _paths(cfg)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        where = ("" if len(missing) == len(composed)
                 else f" with {' '.join(o for o in missing[0] if o not in first) or ' '.join(first)}")
        parent = key.rsplit(".", 1)[0] if "." in key else None
        node = OmegaConf.select(cfg, parent) if parent and _has_path(cfg, parent) else None
        target = node["_target_"] if isinstance(node, DictConfig) and "_target_" in node.keys() else None
        hint = (f"{key.rsplit('.', 1)[1]} is an argument of {target} that the config does not list: add it with "
                f"a +: +{text}; " if target and not adding and not text.startswith("~")
                and _takes(target, key.rsplit(".", 1)[1]) else "")
        if parent and parent.endswith(".kwargs") and not adding and not text.startswith("~") and \
                _in_instantiated_node(cfg, key):  # model.kwargs.img_size=384: a mapping's new key needs a +
            hint = f"{parent} passes arguments on to the library's model: add one with a +: +{text}; "
            close = []
        takes_presets = "experiment" in _default_groups(config_dir, config_name)  # run.py's config, not the others
        preset = _preset_with(config_dir, key) if takes_presets else None
        if preset is not None:  # finetuned= without experiment=finetune_study
            now = (chosen.get("experiment") or [None])[0]  # the preset the command already chose, if any
            hint = (f"{key} is a key of a preset: " + (f"use experiment={preset} instead of experiment={now}; "
                                                        if now and now != "null" else
                                                        f"add experiment={preset} to the command; ") + hint)
        group = key.split(".")[0]
        options = _options_with(config_dir, key) if preset is None and "." in key else []
        if options:  # dataset.path given with dataset=hf: a key of another option of the group
            lacking = missing[0]  # the variant of the command that lacks the key: its choice of the group
            now = next((o.split("=", 1)[1] for o in lacking if o.startswith(f"{group}=")), None)
            named = [f"{group}={o}" for o in options[:4]] + ([f"{len(options) - 4} more"] if len(options) > 4 else [])
            hint = (f"{key} is a key of {', '.join(named[:-1]) + ' and ' if len(named) > 1 else ''}{named[-1]}"
                    + (f", not of {group}={now}" if now else "") + "; ") + hint
        raise ConfigError(f"unknown key '{key}' in {text}{where}: "
                          + (f"the closest known key is '{close[0]}'; " if close and preset is None and not options
                             else "")
                          + hint + f"`{script} --cfg job` prints every key")


def _options_with(config_dir: Path, key: str) -> list[str]:
    """The options of ``key``'s config group (``conf/dataset/<option>.yaml`` for ``dataset.path``)
    whose own file sets the rest of the key."""
    group, rest = key.split(".", 1)
    root = Path(config_dir)

    def sets(path: Path, depth: int = 0) -> bool:  # the file, or a file its defaults merge in here
        node = _config_file(path)
        if node is None:
            return False
        if _has_path(node, rest):
            return True
        for entry in node.get("defaults") or []:  # /common/timm@_here_: that file's keys are this option's
            if depth < 4 and isinstance(entry, str) and entry.endswith("@_here_") and entry.startswith("/"):
                if sets(root / f"{entry[1:].split('@')[0]}.yaml", depth + 1):
                    return True
        return False

    return [path.stem for path in sorted((root / group).glob("*.yaml")) if sets(path)]


def _preset_with(config_dir: Path, key: str) -> str | None:
    """The experiment preset (``conf/experiment/<name>.yaml``) that itself sets ``key``, or None."""
    if key.split(".")[0] in ("defaults", "hydra"):
        return None
    for path in sorted((Path(config_dir) / "experiment").glob("*.yaml")):
        node = _config_file(path)
        if node is not None and _has_path(node, key):
            return path.stem
    return None


def _config_file(path: Path) -> DictConfig | None:
    """One config file as written (its defaults list unresolved), or None where it cannot be read."""
    try:
        node = OmegaConf.load(path)
    except (OSError, ValueError):
        return None
    return node if isinstance(node, DictConfig) else None


def _in_instantiated_node(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is an argument of an instantiated node (a ``_target_``'s: ``reducer.min_dist``),
    which deleting gives back to the library's default, rather than one of latentmap's own settings."""
    parent = key.rsplit(".", 1)[0] if "." in key else None
    node = OmegaConf.select(cfg, parent) if parent and _has_path(cfg, parent) else None
    if isinstance(node, DictConfig) and parent.endswith(".kwargs") and "_target_" not in node.keys():
        return _in_instantiated_node(cfg, parent)  # model.kwargs.img_size: an argument the model passes on
    return isinstance(node, DictConfig) and "_target_" in node.keys()


def _deleted(cfg: DictConfig, key: str, text: str) -> str:
    """The line refusing ``~key`` of a setting latentmap reads, with the value to set instead as the
    config writes it (an interpolation quoted, ``null``, ``true``)."""
    node = OmegaConf.select(cfg, key, throw_on_missing=False)
    if isinstance(node, DictConfig):
        first = next(iter(node.keys()), "<key>")
        return (f"{text} deletes the settings under {key}, which latentmap reads: leave it out, or set one of "
                f"them (e.g. {key}.{first}=...)")
    parent, name = key.rsplit(".", 1) if "." in key else ("", key)
    container = OmegaConf.select(cfg, parent) if parent else cfg
    raw = OmegaConf.to_container(container, resolve=False).get(name) if isinstance(container, DictConfig) else None
    if raw is None:
        shown = "null"
    elif isinstance(raw, bool):
        shown = str(raw).lower()
    elif isinstance(raw, str) and "${" in raw:
        shown = f"'{raw}'"
    elif isinstance(raw, str | int | float) and raw != "???":  # ???: required, no value yet
        shown = str(raw)
    else:
        shown = "<value>"
    now = "" if shown == "<value>" else ", its value now"
    return f"{text} deletes the setting {key}, which latentmap reads: set it instead (e.g. {key}={shown}{now})"


def _required_choices(config_dir: str | Path, config_name: str) -> list[str]:
    """The defaults-list entries the primary config leaves for the command to choose (``???``), as
    the command names them (``model@model_b``)."""
    try:
        defaults = OmegaConf.load(Path(config_dir) / f"{config_name}.yaml").get("defaults") or []
    except (OSError, ValueError):
        return []
    return [str(next(iter(entry))) for entry in defaults
            if isinstance(entry, DictConfig) and len(entry) == 1 and OmegaConf.is_missing(entry, next(iter(entry)))]


def _default_groups(config_dir: str | Path, config_name: str) -> dict[str, str | None]:
    """The groups the primary config's defaults list names, each with its default option (None where
    the list leaves it empty, ``- experiment: null``, which ``~group`` may delete)."""
    try:
        defaults = OmegaConf.load(Path(config_dir) / f"{config_name}.yaml").get("defaults") or []
    except (OSError, ValueError):
        return {}
    found = {}
    for entry in defaults:
        if isinstance(entry, DictConfig) and len(entry) == 1:
            key = next(iter(entry))
            name = str(key).removeprefix("override ").split("@")[0]
            found[name] = "???" if OmegaConf.is_missing(entry, key) else entry[key]  # ???: the command chooses
    return found


def _writable_folder(key: str, value) -> None:
    """``value`` (a folder a command will write, ``output_dir``) can be that folder here: not empty
    (Hydra would write under ``/``), not a file, and under a folder this user may write where it does
    not exist yet; a ConfigError line otherwise, before Hydra makes anything. Nothing is made here
    (jobs started at once may make the same folder); a value Hydra fills in (``${...}``) is its own."""
    if value is None or not str(value).strip():
        raise ConfigError(f"{key}={value!r} is empty: set it, e.g. {key}=outputs" if value is not None
                          else f"{key} is null: set it, e.g. {key}=outputs")
    if "${" in str(value):
        return
    from latentmap.targets import cannot_make

    path = Path(os.path.abspath(os.path.expanduser(str(value))))  # '..' resolved as the system will
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}={value!r} is a file, not a folder: choose a folder, e.g. {key}=outputs")
    except OSError:  # a parent this user may not search: said below
        pass
    reason = cannot_make(path)  # a probe file, not os.access, which says yes to root and on /proc
    if reason:
        raise ConfigError(f"{key}={value!r} cannot be made ({reason}): choose a writable folder, e.g. {key}=outputs")


def _takes(target: str, argument: str) -> bool | None:
    """Whether the class or function ``target`` (a config's ``_target_``) takes ``argument``: a
    parameter of that name, or any keyword (``**kwargs``). None when it cannot be imported."""
    parameters = _parameters(target)
    if parameters is None:
        return None
    import inspect

    return argument in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _parameters(target: str) -> dict | None:
    """``target``'s parameters by name, or None where it cannot be imported or has no signature."""
    import inspect

    from hydra.utils import get_object

    try:
        return dict(inspect.signature(get_object(target)).parameters)
    except Exception:  # noqa: BLE001 - not importable here, or no signature: no hint rather than a wrong one
        return None


def _refuse_argument_not_taken(cfg: DictConfig, key: str, text: str, targets: dict[str, str]) -> None:
    """``+model.img_size=384``: an argument added to an instantiated node whose class has no such
    parameter fails only when the run makes it (a TypeError after the MLflow run began). Refused
    here, with the class's own arguments, and where the node passes a mapping on (``model.kwargs``
    to timm.create_model), the key under it. ``targets``: the ``_target_`` the command line gives a
    node (``optimizer._target_=torch.optim.SGD +optimizer.momentum=0.9``), checked instead of the
    config's."""
    parent, name = key.rsplit(".", 1) if "." in key else ("", key)
    if name.startswith("_") and name.endswith("_"):  # Hydra's own (_convert_, _recursive_, _partial_, _args_)
        return
    node = OmegaConf.select(cfg, parent) if parent and _has_path(cfg, parent) else None
    if not (isinstance(node, DictConfig) and "_target_" in node.keys()) or name in node.keys():
        return
    target = targets.get(parent, str(node["_target_"]))
    if _takes(target, name) is not False:
        return
    own = [p for p in (_parameters(target) or {}) if not p.startswith("_")]
    value = text.split("=", 1)[1] if "=" in text else "<value>"
    passes = next((k for k in node.keys() if str(k) == "kwargs" and isinstance(node.get(k), DictConfig)), None)
    hint = (f"; arguments of the library's own model go under {parent}.kwargs: +{parent}.kwargs.{name}={value}"
            if passes else "")
    raise ConfigError(f"{text}: {name} is not an argument of {target} (its arguments: {', '.join(own)}){hint}")


def _refuse_unreadable(parser, overrides: list[str], sweep: bool) -> None:
    """One line for a ``key=value`` Hydra's grammar cannot read (``dataset.path=~/x``: a value with
    ``~``, spaces, brackets, ...), naming it and the quoted form that reads; Hydra's own message is
    a lexer's exception with a caret and a link. In a sweep (``sweep``: ``-m``) a comma separates
    its values, each quoted on its own; otherwise the comma is the value's (a folder named ``a, b``)."""
    from hydra.errors import HydraException

    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            key, sep, value = override.partition("=")
            if not sep or not key or "'" in value:
                return
            whole = f"\"{key}='{value}'\""
            if sweep and "," in value:  # a sweep's items, each quoted: or one value holding a comma
                items = ",".join(f"'{item}'" for item in value.split(","))
                how = (f"\"{key}={items}\" (characters such as ~ = [ ] {{ }} ( ) need quotes; a comma separates a "
                       f"sweep's values: for one value with a comma in it, {whole})")
            else:
                how = f"{whole} (characters such as ~ = [ ] {{ }} ( ) , need quotes)"
            raise ConfigError(f"{override} is not a value Hydra's override grammar can read: quote it, "
                              f"as {how}") from None


def refuse_unknown_keys(argv: list[str], config_dir: Path, config_name: str, script: str) -> None:
    """:func:`check_command_line` for an entry point: a mistake is one error line and exit 1."""
    import sys

    try:
        check_command_line(argv, config_dir, config_name, script)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def command_name(script: str) -> str:
    """How the user called this command, for a message: ``python run.py`` from the shim, the
    installed command's name (``latentmap``) otherwise."""
    import sys

    called = sys.argv[0] if sys.argv and sys.argv[0] else script
    return f"python {script}" if called.endswith(".py") else Path(called).name


def command_help(config_dir: Path, config_name: str, script: str) -> str:
    """``--help`` of a command other than ``run.py`` (whose help is Hydra's, from
    ``conf/hydra/default.yaml``, written for run.py): the config file's opening comment, the usage,
    the config groups it takes with their options, and where every key is described. Hydra's own
    help would print run.py's text here, and fails outright on a config whose groups have no
    default (``model@model_a: ???``)."""
    text = (config_dir / f"{config_name}.yaml").read_text()
    about = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        about.append(line[1:].removeprefix(" "))
    groups = []
    defaults = OmegaConf.to_container(OmegaConf.create(text), resolve=False).get("defaults") or []
    for group, default in (item for entry in defaults if isinstance(entry, dict) for item in entry.items()):
        default = "null" if default is None else str(default)
        folder = group.split("@")[0]
        if folder == "hydra" or not (config_dir / folder).is_dir():
            continue
        options = ", ".join(sorted(option.stem for option in (config_dir / folder).glob("*.yaml")))
        chosen = {"???": "required", "null": "none by default"}.get(default, f"default {default}")
        groups.append(f"  {group}=<option>  ({chosen}): {options}")
    command = command_name(script)
    return "\n".join([*about, "", f"Usage: {command} [group=option] [key=value ...]", "",
                      "Config groups:", *groups, "",
                      f"Every key, with its default and rule: docs/reference/configuration.md ({script}),",
                      f"or the file itself: conf/{config_name}.yaml."])


SHARED_CONFIGS = "common"  # conf/common: files the configs include (defaults lists), not a group to pick


def hydra_command(main, config_name: str, script: str) -> None:
    """Run a Hydra main as an installed command: first refuse, in one line, a key the config does not
    define (:func:`refuse_unknown_keys`), then let Hydra compose and run. ``--help`` of a command
    other than run.py is :func:`command_help`."""
    import sys

    if config_name != "config" and _asks_help(sys.argv[1:]):
        try:
            text = command_help(CONF_DIR, config_name, script)
        except OSError as error:  # conf/ missing: not an editable install of the repository
            print(f"error: {script} --help reads conf/{config_name}.yaml: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `--help | head`: the reader left; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    refuse_unknown_keys(sys.argv[1:], CONF_DIR, config_name, command_name(script))
    if config_name == "config" and _asks_help(sys.argv[1:]):
        _help_without_shared_files(main)
    from latentmap import stopping

    with stopping.sigterm_as_interrupt():  # SIGTERM ends a run as Ctrl-C does: KILLED, nothing half-written
        main()


def _help_without_shared_files(main) -> None:
    """run.py's ``--help`` is Hydra's (our template), less one line: Hydra lists every folder of
    ``conf/`` as a config group, ``common`` too, which holds the files other configs include, not
    options a user picks."""
    import contextlib
    import io
    import sys

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            main()
    finally:
        lines = buffer.getvalue().split("\n")
        try:
            print("\n".join(line for line in lines if not line.startswith(f"{SHARED_CONFIGS}: ")), end="", flush=True)
        except BrokenPipeError:  # `--help | head`: the reader left; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _asks_help(argv: list[str]) -> bool:
    """Whether Hydra would read ``argv`` as a request for help: its own parser decides, so that
    ``--hel`` or ``-mh`` count as argparse counts them, and ``x=--help`` (a value) does not."""
    try:
        from hydra._internal.utils import get_args_parser  # Hydra's parser; private, hence the fallback

        return bool(get_args_parser().parse_known_args(argv)[0].help)
    except (ImportError, AttributeError, SystemExit):
        return any(arg in ("--help", "-h") for arg in argv)
