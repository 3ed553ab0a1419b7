"""What the command line says about a config: one line for a key or value that Hydra's composition refuses
(`explain`) or lets through (`check`, run by the `SchemaCheck` callback before a run dir exists), and the keys of
`python -m cap --help` with their types and docs (the `cap.help` resolver of conf/hydra/help/cap.yaml), both read
from the schema in cap/config.py."""
import dataclasses
import difflib
import re
import shutil
import sys
from pathlib import Path

from hydra.errors import MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, ConfigTypeError, MissingMandatoryValue,
                              OmegaConfBaseException)

from cap.config import VARIANTS, key_docs, lookup, schemas_at
from cap.errors import UserError

_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "any": "a value",
             "list of float": "a list of numbers such as [0.3,0.6]", "list of str": "a list of names such as [a,b]"}


def _expected(type_name: str) -> str:
    """`float or null` -> `a number or null`."""
    base, optional = type_name.removesuffix(" or null"), type_name.endswith(" or null")
    return _EXPECTED.get(base, base) + (" or null" if optional else "")


def _owner(full_key: str) -> str | None:
    """The group option whose schema has `full_key` (`prune.sequence` -> method=cap_f)."""
    root, _, rest = full_key.partition(".")
    name = rest.split(".")[0]
    return next((option for schema, option in VARIANTS.get(root, {}).items() if name in key_docs(schema)), None)


def unknown_key(full_key: str, known) -> str:
    """The one-line error for a key the composition lacks: the option that has it, or the close matches."""
    owner = _owner(full_key)
    if owner:
        return f"{full_key}: not a key of this composition; it comes with {owner}"
    parent = full_key.rpartition(".")[0]
    close = difflib.get_close_matches(full_key.rpartition(".")[2], list(known), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join((parent + '.' if parent else '') + c for c in close)}?" if close else \
        "python -m cap --help lists the keys"
    return f"{full_key}: no such key; {hint}"


def bad_value(full_key: str, value: str, detail: str = "") -> str:
    """The one-line error for a value the schema's type refuses."""
    key = re.sub(r"\[\d+\]$", "", full_key)
    found = lookup(key)
    if found is None:
        return f"{key}={value}: {detail}"
    kind, text = found
    return f"{key}={value}: expected {_expected(kind)} ({text})"


# ------------------------------------------------------------------------------------- composition errors

def explain(err: Exception) -> str:
    """One line for an error of Hydra's composition (a bad override, an unknown option or key), naming the key
    and saying what to do; Hydra's own messages span several lines and end in a stack trace hint."""
    cause, message = err.__cause__, str(err).strip()
    if isinstance(err, OverrideParseException):
        return (f"{err.override}: Hydra cannot parse it ({message.splitlines()[0]}); quote values with spaces or "
                "brackets, e.g. 'key=[a,b]'")
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; choose one of {', '.join(err.options)} (python -m cap --help)"
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:  # key=value, key not in schema
        schema = cause.object_type
        return unknown_key(cause.full_key, key_docs(schema) if dataclasses.is_dataclass(schema) else ())
    merging = re.fullmatch(r"Error merging override (.*)", message)
    if merging and isinstance(cause, OmegaConfBaseException) and cause.full_key:
        override = merging[1]
        if isinstance(cause, ConfigTypeError) and override.startswith("~"):
            return f"{override}: a key of the schema cannot be deleted; set it instead ({cause.full_key}=...)"
        return bad_value(cause.full_key, override.partition("=")[2], cause.msg.splitlines()[0])
    in_file = re.match(r"In '(.+?)': \w+ raised while composing config:\n(.+)\n\s*full_key: (\S+)", message)
    if in_file:  # a config file (a preset of one's own, say) sets a key the schema lacks or a value of the wrong type
        source, problem, full_key = in_file.groups()
        if problem.startswith("Key "):
            known = {key for schema in schemas_at(full_key.rpartition(".")[0]) for key in key_docs(schema)}
            return f"{source}.yaml: {unknown_key(full_key, known)}"
        value = re.match(r"Value '(.*?)'", problem)
        return f"{source}.yaml: " + (bad_value(full_key, value[1]) if value else f"{full_key}: {problem}")
    exists = re.search(r"Could not append to config. An item is already at '(.+?)'", message)
    if exists:
        return f"+{exists[1]}: {exists[1]} exists already: drop the + to set it"
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def check(cfg: DictConfig) -> None:
    """UserError for what Hydra's composition lets through: a key the schema lacks (`+trainer.lrr=1`: Hydra's `+`
    adds keys even to a structured config), a key with no value (???), an interpolation of the wrong type."""
    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        known = key_docs(schema) if dataclasses.is_dataclass(schema) else None
        for key in node:
            full = f"{prefix}{key}"
            if full == "hydra":
                continue
            if known is not None and key not in known:
                raise UserError(unknown_key(full, known))
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                if full in VARIANTS and OmegaConf.get_type(child) not in VARIANTS[full]:  # +prune.x=1 on finetune
                    raise UserError(unknown_key(".".join([full, *list(child)[:1]]), ()))
                walk(child, full + ".")
                continue
            try:
                value = node[key]
                if isinstance(value, ListConfig):
                    OmegaConf.to_container(value, resolve=True)
            except MissingMandatoryValue:
                raise UserError(f"{full} has no value: set {full}=...") from None
            except OmegaConfBaseException as err:
                raise UserError(bad_value(full, child._value(), str(err).splitlines()[0])) from None

    walk(cfg, "")


class SchemaCheck(Callback):
    """`check` after composition, before Hydra creates a run dir (conf/config.yaml: hydra.callbacks). Hydra turns
    a callback's exceptions into warnings, so a failed check ends the program here, as cap.__main__ does."""

    new_sweep_dir: Path | None = None  # the outermost folder a multirun is about to create

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            SchemaCheck.new_sweep_dir = next(p for p in [*reversed(sweep_dir.parents), sweep_dir] if not p.exists())

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check(config)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    @classmethod
    def remove_empty_sweep_dir(cls) -> None:
        """Hydra writes a sweep's multirun.yaml before it composes the sweep's jobs: remove it (and the folders made
        for it) when a job then fails to compose."""
        new = cls.new_sweep_dir
        if new is not None and new.is_dir() and all(p.is_dir() or p.name == "multirun.yaml" for p in new.rglob("*")):
            shutil.rmtree(new)


# ------------------------------------------------------------------------------------------------ --help

def _override_text(value) -> str:
    """A value as one types it in key=value."""
    if isinstance(value, list):
        return "[" + ",".join(_override_text(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def help_lines(node: DictConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key=value, type, doc) of every key under `node`, values as composed (interpolations unresolved)."""
    schema = OmegaConf.get_type(node)
    docs = key_docs(schema) if dataclasses.is_dataclass(schema) else {}
    lines = []
    for key in node:
        if f"{prefix}{key}" == "hydra":  # Hydra's own node: --hydra-help
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            lines += help_lines(child, f"{prefix}{key}.")
            continue
        value = OmegaConf.to_container(child, resolve=False) if isinstance(child, ListConfig) else child._value()
        lines.append((f"{prefix}{key}={_override_text(value)}", *docs.get(key, ("any", ""))))
    return lines


def help_text(*, _root_: DictConfig) -> str:
    """The keys of `--help`: this composition's, then those other options bring (`$` doubled for Hydra's
    string.Template)."""
    lines = help_lines(_root_)
    for root, schemas in VARIANTS.items():
        node = _root_._get_node(root)
        current = OmegaConf.get_type(node)
        shown = set(key_docs(current)) if dataclasses.is_dataclass(current) else set()
        for schema, option in schemas.items():
            lines += [(f"{root}.{key}", kind, f"[{option}] {text}") for key, (kind, text) in key_docs(schema).items()
                      if key not in shown]
            shown |= set(key_docs(schema))
    width = min(max(len(kv) for kv, _, _ in lines), 44)
    type_width = max(len(kind) for _, kind, _ in lines)
    return "\n".join(f"{kv:<{width}}  {kind:<{type_width}}  {text}".rstrip() for kv, kind, text in lines).replace(
        "$", "$$")


if not OmegaConf.has_resolver("cap.help"):
    OmegaConf.register_new_resolver("cap.help", help_text)
