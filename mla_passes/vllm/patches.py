"""Every change mla-passes makes to vLLM's own classes, in one module.

vLLM has no public hook for a third-party pass to own a ``pass_config`` key
or to take part in choosing ``splitting_ops``, so the plugin
(:mod:`mla_passes.vllm.plugin`) changes four of vLLM's config classes at
startup. What is changed, and why, lives here so that a new vLLM release is
checked in one place (``tests/test_vllm_patches.py`` runs against the
installed vLLM; ``tools/check_vllm_version.sh 0.33.0`` / ``0.34.0`` run it
against those releases):

1. :func:`add_pass_config_fields` - ``PassConfig`` (a pydantic dataclass with
   ``extra="forbid"`` in 0.32 to 0.34) gains our fields; the pydantic
   validators of the configs that embed it are rebuilt. The new fields are
   real dataclass fields (made by :func:`dataclasses.make_dataclass`), so
   ``dataclasses.fields()``, ``asdict`` and vLLM's hash recipe see them.
2. :func:`wrap_pass_config` - ``PassConfig.__post_init__`` gets a hook that
   runs first; the hash recipe leaves out our keys while at their defaults
   (the flag off hashes as without the plugin). The recipe is
   ``PassConfig.compute_hash`` in 0.32/0.33 and ``PassConfig.compile_factors``
   (hashed by ``vllm.config.utils.hash_config``) in 0.34; :func:`config_hash`
   and :func:`own_hash` hide the difference.
3. :func:`wrap_set_splitting_ops` - ``CompilationConfig.set_splitting_ops_for_v1``
   gets a hook before it (the compilation mode is final there: after the
   platform's ``check_and_update_config``) and one after. The plugin turns on
   Inductor graph partition before vLLM computes ``splitting_ops`` from it, so
   vLLM's own logic (which ops split, where the kv-cache update goes) sees
   the final value, then adds our attention op to the list.
4. :func:`wrap_vllm_config` - ``VllmConfig.__post_init__`` gets a hook before
   it (to read what the user asked for before vLLM fills defaults) and one
   after (the plugin wires its pass into the finished config).

Each wrapper is idempotent (marked on the class) and calls vLLM's original.
:func:`missing_hooks` names what a vLLM build lacks, for the version gate.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import logging
import sys
from typing import Any, Callable

logger = logging.getLogger(__name__)

_MARK = "_mla_passes_patched"


def missing_hooks() -> list[str]:
    """The vLLM config attributes these patches need and this vLLM lacks."""
    missing = []
    try:
        from vllm.config.compilation import CompilationConfig, PassConfig
        from vllm.config.vllm import VllmConfig
    except ImportError as e:
        return [f"vllm.config ({e})"]
    if _hash_method(PassConfig) is None:
        missing.append("PassConfig.compute_hash or PassConfig.compile_factors")
    for cls, attr in ((PassConfig, "__post_init__"),
                      (CompilationConfig, "set_splitting_ops_for_v1"),
                      (CompilationConfig, "use_inductor_graph_partition"),
                      (CompilationConfig, "splitting_ops"), (VllmConfig, "__post_init__")):
        if not hasattr(cls, attr) and attr not in getattr(cls, "__dataclass_fields__", {}):
            missing.append(f"{cls.__name__}.{attr}")
    return missing


# --- 1. PassConfig fields -----------------------------------------------------------

def add_pass_config_fields(compilation, fields: dict[str, tuple[Any, Any]]) -> bool:
    """Add ``fields`` (name -> (annotation, default)) to ``compilation.PassConfig``
    and rebuild the pydantic validators that embed it. Returns False if done before."""
    from pydantic.dataclasses import rebuild_dataclass

    pass_config = compilation.PassConfig
    if getattr(pass_config, "_mla_passes_fields", None) is not None:
        return False
    made = dataclasses.make_dataclass(
        "_MLAPassesFields", [(n, a, dataclasses.field(default=d)) for n, (a, d) in fields.items()])
    for f in dataclasses.fields(made):
        if f.name in pass_config.__dataclass_fields__:
            continue
        pass_config.__dataclass_fields__[f.name] = f
        pass_config.__annotations__[f.name] = f.type
        setattr(pass_config, f.name, f.default)
    pass_config._mla_passes_fields = tuple(fields)
    rebuild_dataclass(pass_config, force=True)
    rebuild_dataclass(compilation.CompilationConfig, force=True)
    vllm_mod = sys.modules.get("vllm.config.vllm")
    if vllm_mod is not None and hasattr(vllm_mod, "VllmConfig"):
        rebuild_dataclass(vllm_mod.VllmConfig, force=True)
    return True


class ExtendWhenLoaded(importlib.abc.MetaPathFinder):
    """Calls ``action(module)`` as soon as ``vllm.config.compilation`` has
    defined ``PassConfig`` and ``CompilationConfig``: checked on every later
    import, then removed. For configs built before vLLM loads general plugins."""

    busy = False

    def __init__(self, action: Callable[[Any], None]):
        self.action = action

    def find_spec(self, fullname, path=None, target=None):
        if ExtendWhenLoaded.busy:
            return None
        mod = sys.modules.get("vllm.config.compilation")
        if mod is not None and hasattr(mod, "CompilationConfig") and hasattr(mod, "PassConfig"):
            ExtendWhenLoaded.busy = True
            try:
                self.action(mod)
            except Exception:  # never break vLLM's import; register() retries
                logger.exception("mla-passes: could not extend vLLM's PassConfig early")
            finally:
                ExtendWhenLoaded.busy = False
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
        return None


def when_compilation_loaded(action: Callable[[Any], None]) -> None:
    """Run ``action(vllm.config.compilation)`` now if it is loaded, else when it is."""
    mod = sys.modules.get("vllm.config.compilation")
    if mod is not None and hasattr(mod, "CompilationConfig"):
        action(mod)
    elif not any(isinstance(f, ExtendWhenLoaded) for f in sys.meta_path):
        sys.meta_path.insert(0, ExtendWhenLoaded(action))


# --- 2. PassConfig.__post_init__ / compute_hash -------------------------------------

def _hash_method(cls) -> str | None:
    """The name of the method that holds a config's hash recipe: ``compile_factors``
    (vLLM 0.34: a dict of factors, hashed by ``hash_config``) or ``compute_hash``
    (0.32/0.33: the hex digest itself); None when neither is there."""
    for name in ("compile_factors", "compute_hash"):
        if callable(getattr(cls, name, None)):
            return name
    return None


def config_hash(config) -> str:
    """The hash vLLM takes of ``config`` (a ``PassConfig``, ``CompilationConfig``...),
    whichever recipe this vLLM has."""
    if _hash_method(type(config)) == "compile_factors":
        from vllm.config.utils import hash_config

        return hash_config(config)
    return config.compute_hash()


def own_hash(config, ignored: set) -> str:
    """vLLM's own recipe for ``config``, over every dataclass field but ``ignored``
    (what ``PassConfig`` hashes as without the plugin when ``ignored`` is our keys)."""
    from vllm.config import utils

    if hasattr(utils, "get_compile_factors"):  # 0.34
        return utils.hash_factors(utils.get_compile_factors(config, set(ignored)))
    return utils.hash_factors(utils.get_hash_factors(config, set(ignored)))


def wrap_pass_config(cls, before_post_init: Callable[[Any], None], hash_ignored: Callable[[Any], set]) -> None:
    """``before_post_init(self)`` runs before vLLM's ``PassConfig.__post_init__``;
    the hash recipe (``compute_hash`` or ``compile_factors``) leaves out the
    names ``hash_ignored(self)`` returns."""
    if cls.__dict__.get(_MARK):
        return
    orig_post_init = cls.__post_init__

    @functools.wraps(orig_post_init)
    def __post_init__(self) -> None:
        before_post_init(self)
        orig_post_init(self)

    cls.__post_init__ = __post_init__
    method = _hash_method(cls)
    if method == "compile_factors":
        @functools.wraps(cls.compile_factors)
        def compile_factors(self):
            from vllm.config.utils import get_compile_factors

            # vLLM 0.34's recipe over every field but the ignored ones.
            return get_compile_factors(self, hash_ignored(self))

        cls.compile_factors = compile_factors
    else:
        @functools.wraps(cls.compute_hash)
        def compute_hash(self) -> str:
            from vllm.config.utils import get_hash_factors, hash_factors

            # vLLM's own recipe (0.32/0.33) over every field but the ignored ones.
            return hash_factors(get_hash_factors(self, hash_ignored(self)))

        cls.compute_hash = compute_hash
    setattr(cls, _MARK, True)


# --- 3. CompilationConfig.set_splitting_ops_for_v1 ----------------------------------

def _wrap_around(cls, name: str, before: Callable[[Any], None], after: Callable[[Any], None]) -> None:
    """Run ``before(self)`` and ``after(self)`` around ``cls.name``, once (marked)."""
    orig = getattr(cls, name)
    if orig.__dict__.get(_MARK):
        return

    @functools.wraps(orig)
    def wrapped(self, *args, **kwargs):
        before(self)
        result = orig(self, *args, **kwargs)
        after(self)
        return result

    setattr(wrapped, _MARK, True)
    setattr(cls, name, wrapped)


def wrap_set_splitting_ops(before: Callable[[Any], None], after: Callable[[Any], None]) -> None:
    from vllm.config.compilation import CompilationConfig

    _wrap_around(CompilationConfig, "set_splitting_ops_for_v1", before, after)


# --- 4. VllmConfig.__post_init__ -----------------------------------------------------

def wrap_vllm_config(before: Callable[[Any], None], after: Callable[[Any], None]) -> None:
    from vllm.config.vllm import VllmConfig

    _wrap_around(VllmConfig, "__post_init__", before, after)


# --- logging ---------------------------------------------------------------------------

class _ToVllmHandlers(logging.Handler):
    """Hands each record to the handlers vLLM's ``vllm`` logger has at that
    moment (vLLM configures them lazily, and again in engine processes)."""

    def emit(self, record: logging.LogRecord) -> None:
        handlers = logging.getLogger("vllm").handlers
        if not handlers and logging.lastResort is not None:
            handlers = [logging.lastResort]  # as for vLLM's own loggers before configuration
        for h in handlers:
            if record.levelno >= h.level:
                h.handle(record)


def share_vllm_log_handlers(tree: str = "mla_passes") -> None:
    """Our loggers form one tree, ``mla_passes``. vLLM configures only its own
    ``vllm`` tree (with ``propagate=False``), so inside vLLM our tree writes
    through vLLM's handlers, at vLLM's level, in vLLM's format. Nothing changes
    when vLLM's logging configuration is off or the user configured our tree."""
    import vllm.envs as envs

    ours = logging.getLogger(tree)
    if not envs.VLLM_CONFIGURE_LOGGING or ours.handlers:
        return
    ours.addHandler(_ToVllmHandlers())
    ours.setLevel(envs.VLLM_LOGGING_LEVEL)
    ours.propagate = False
