"""Backend discovery through pluggy and the ``tensorglot`` entry-point group.

Discovery is lazy: nothing is looked up at import, and listing backends imports only the small plugin
modules (never torch or jax). Each plugin's hook is called on its own, so one plugin that raises, or that
registers a name another plugin already holds, is recorded with its entry point and distribution while
the others keep working. ``TENSORGLOT_STRICT=1`` turns those records back into exceptions: discovery
always runs to the end, and then each query raises the first record while strict mode is on (turning it
off leaves a working registry).

Who owns a name: a name of `KNOWN_PROVIDERS` (``numpy``, ``torch``, ...) belongs to the distribution this
project publishes it in, and any other distribution's registration of it is refused, whatever its
entry point is called or the order plugins load in. Any other name belongs to the plugin whose entry
point carries it; between two such, or two without, the first in (entry-point name, distribution)
order keeps it and the other is refused with an error naming both.

Selection precedence: explicit name > ``with tensorglot.use(name):`` > ``TENSORGLOT_BACKEND`` (read at
call time) > ``"numpy"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata as md
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .backend import KNOWN_CAPABILITIES, Backend

ENTRY_POINT_GROUP = "tensorglot"
DEFAULT_BACKEND = "numpy"
#: Backends this project publishes, so an unknown name can say what to install.
#: Only that distribution may register the name (a plugin from another one is refused, see the module).
KNOWN_PROVIDERS = {
    "numpy": "tensorglot-numpy",
    "torch": "tensorglot-torch",
    "jax": "tensorglot-jax",
    "xp": "tensorglot-xp",
}

_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("tensorglot_backend", default=None)


@dataclass
class BackendInfo:
    """What a plugin registered for one backend; the loader runs on first `get_backend`."""

    name: str
    loader: Callable[[], Backend]
    capabilities: frozenset[str]
    framework: str | None
    plugin: str
    distribution: str | None
    version: str | None

    def framework_version(self) -> str | None:
        """The framework's installed version, read from metadata (never by importing it)."""
        if self.framework is None:
            return None
        try:
            return md.version(self.framework)
        except md.PackageNotFoundError:
            return None


@dataclass
class LoadError:
    """A plugin that could not be loaded or registered something it should not have."""

    plugin: str  # the entry point, "name = module"
    distribution: str | None
    message: str
    exception: BaseException | None = field(default=None, repr=False)


@dataclass
class CommandInfo:
    name: str
    help: str
    configure: Callable[[Any], None]
    run: Callable[[Any], int | None]
    plugin: str


@dataclass
class TransportInfo:
    name: str
    factory: Callable[..., Any]  # see `tensorglot.serving.transport.TransportFactory`
    plugin: str


def _entry_name(label: str) -> str:
    return label.split(" = ")[0]


def _strict() -> bool:
    return os.environ.get("TENSORGLOT_STRICT", "") not in ("", "0", "false", "False")


def _canonical(distribution: str | None) -> str | None:
    """A distribution name as packaging compares them: ``Tensorglot_NumPy`` is ``tensorglot-numpy``."""
    return None if distribution is None else distribution.lower().replace("_", "-").replace(".", "-")


class Registry:
    """The plugin manager plus what its plugins registered. One instance lives in this module."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pm: pluggy.PluginManager | None = None
        self._infos: dict[str, BackendInfo] = {}
        self._instances: dict[str, Backend] = {}
        self._commands: dict[str, CommandInfo] = {}
        self._transports: dict[str, TransportInfo] = {}
        self.errors: list[LoadError] = []
        self._processed: set[str] = set()

    # -- discovery ---------------------------------------------------------------------------------
    @staticmethod
    def entry_points() -> list[md.EntryPoint]:
        """The group's entry points in a fixed order (name, distribution, value), whatever the path order."""

        def key(ep: md.EntryPoint) -> tuple[str, str, str]:
            return ep.name, (ep.dist.name if ep.dist is not None else ""), ep.value

        return sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=key)

    def available(self) -> list[str]:
        """Backend names from entry-point metadata (and plugins registered in-process); imports nothing."""
        names = {ep.name for ep in self.entry_points() if "." not in ep.name}
        names.update(self._infos)
        return sorted(names)

    def _manager(self) -> pluggy.PluginManager:
        if self._pm is None:
            pm = pluggy.PluginManager("tensorglot")
            pm.add_hookspecs(hookspecs)
            self._pm = pm
            for ep in self.entry_points():  # records, never raises: every plugin gets its turn
                self._load_entry_point(pm, ep)
        if _strict():
            self._raise_first(self.errors)
        return self._pm

    @staticmethod
    def _raise_first(errors: list[LoadError]) -> None:
        if errors:
            e = errors[0]
            raise RuntimeError(
                f"tensorglot plugin {e.plugin} ({e.distribution}): {e.message} (TENSORGLOT_STRICT is set)"
            ) from e.exception

    def _record(self, plugin: str, distribution: str | None, message: str, exc: BaseException | None) -> None:
        self.errors.append(LoadError(plugin, distribution, message, exc))

    def _load_entry_point(self, pm: pluggy.PluginManager, ep: md.EntryPoint) -> None:
        label = f"{ep.name} = {ep.value}"
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        try:
            module = ep.load()
            pm.register(module, name=label)
        except Exception as exc:  # a broken plugin must not take the host down
            self._record(label, dist, f"failed to load: {type(exc).__name__}: {exc}", exc)
            return
        self._process(pm, label, dist, version)

    def _process(self, pm: pluggy.PluginManager, label: str, dist: str | None, version: str | None) -> None:
        """Call this plugin's hooks alone, so errors and duplicates are pinned on it."""
        plugin = pm.get_plugin(label)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(plugin)
            self._record(label, dist, f"invalid hooks: {exc}", exc)
            return

        def register(
            name: str,
            loader: Callable[[], Backend],
            *,
            capabilities: frozenset[str] | set[str] = frozenset(),
            framework: str | None = None,
        ) -> None:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"register: backend name must be a non-empty str without '.', got {name!r}")
            unknown = set(capabilities) - KNOWN_CAPABILITIES
            if unknown:
                raise ValueError(f"register: unknown capabilities {sorted(unknown)} for backend {name!r}")
            owner = KNOWN_PROVIDERS.get(name)
            if owner is not None and _canonical(dist) != owner:
                self._record(
                    label,
                    dist,
                    f"backend {name!r} belongs to the distribution {owner}; {label} ({dist}) may not "
                    "register it; this registration is ignored",
                    None,
                )
                return
            if name in self._infos:
                held = self._infos[name]
                # The plugin whose entry point carries the backend's name owns it, whatever the load order.
                if _entry_name(label) == name and _entry_name(held.plugin) != name:
                    self._record(
                        held.plugin,
                        held.distribution,
                        f"backend {name!r} belongs to {label} ({dist}); this registration is ignored",
                        None,
                    )
                else:
                    self._record(
                        label,
                        dist,
                        f"backend {name!r} is already registered by {held.plugin} ({held.distribution}); "
                        "this registration is ignored",
                        None,
                    )
                    return
            self._infos[name] = BackendInfo(name, loader, frozenset(capabilities), framework, label, dist, version)

        def register_command(
            name: str, help: str, configure: Callable[[Any], None], run: Callable[[Any], int | None]
        ) -> None:
            if name in self._commands:
                self._record(label, dist, f"command {name!r} is already registered", None)
                return
            self._commands[name] = CommandInfo(name, help, configure, run, label)

        def register_transport(name: str, factory: Callable[..., Any]) -> None:
            if name in self._transports:
                self._record(label, dist, f"transport {name!r} is already registered", None)
                return
            self._transports[name] = TransportInfo(name, factory, label)

        for hook, callback in (
            (pm.hook.tensorglot_register_backends, register),
            (pm.hook.tensorglot_register_commands, register_command),
            (pm.hook.tensorglot_register_transports, register_transport),
        ):
            for impl in hook.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    impl.function(register=callback)
                except Exception as exc:
                    self._record(label, dist, f"{hook.name} raised {type(exc).__name__}: {exc}", exc)

    def register_plugin(self, plugin: object, *, name: str, distribution: str | None = None) -> None:
        """Register a plugin object in-process (tests, notebooks): as if found through an entry point."""
        with self._lock:
            pm = self._manager()
            pm.register(plugin, name=name)
            before = len(self.errors)
            self._process(pm, name, distribution, None)
            if _strict():
                self._raise_first(self.errors[before:])

    def unregister_plugin(self, name: str) -> None:
        with self._lock:
            pm = self._manager()
            plugin = pm.get_plugin(name)
            if plugin is not None:
                pm.unregister(plugin)
            for backend in [b for b, info in self._infos.items() if info.plugin == name]:
                del self._infos[backend]
                self._instances.pop(backend, None)
            for cmd in [c for c, info in self._commands.items() if info.plugin == name]:
                del self._commands[cmd]
            for t in [t for t, info in self._transports.items() if info.plugin == name]:
                del self._transports[t]
            self.errors = [e for e in self.errors if e.plugin != name]

    # -- queries -----------------------------------------------------------------------------------
    @property
    def hook(self) -> Any:
        """The plugins' hooks, for those the host calls when it needs them (``tensorglot_prepare_host_devices``)."""
        with self._lock:
            return self._manager().hook

    def infos(self) -> dict[str, BackendInfo]:
        with self._lock:
            self._manager()
            return dict(self._infos)

    def commands(self) -> dict[str, CommandInfo]:
        with self._lock:
            self._manager()
            return dict(self._commands)

    def transports(self) -> dict[str, TransportInfo]:
        with self._lock:
            self._manager()
            return dict(self._transports)

    def get(self, name: str | None = None) -> Backend:
        name = resolve_name(name)
        with self._lock:
            if name in self._instances:
                return self._instances[name]
            infos = self.infos()
            if name not in infos:
                raise ValueError(self._unknown_message(name, infos))
            info = infos[name]
            try:
                backend = info.loader()
            except Exception as exc:
                raise RuntimeError(
                    f"get_backend: backend {name!r} from {info.plugin} ({info.distribution}) failed to "
                    f"load: {type(exc).__name__}: {exc}"
                ) from exc
            self._instances[name] = backend
            return backend

    def _unknown_message(self, name: str, infos: dict[str, BackendInfo]) -> str:
        installed = ", ".join(sorted(infos)) or "none"
        msg = f"get_backend: unknown backend {name!r}; installed backends: {installed}."
        failed = [e for e in self.errors if _entry_name(e.plugin) == name]
        if failed:
            msg += f" Plugin {failed[0].plugin} ({failed[0].distribution}) {failed[0].message}."
        elif name in KNOWN_PROVIDERS:
            msg += f" It is provided by `pip install {KNOWN_PROVIDERS[name]}`."
        return msg


_registry = Registry()


def registry() -> Registry:
    """The process-wide registry."""
    return _registry


def resolve_name(name: str | None = None) -> str:
    """Explicit name > `use()` context > ``TENSORGLOT_BACKEND`` > ``"numpy"``."""
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"get_backend: name must be a str or None, got {type(name).__name__}")
        return name
    selected = _selected.get()
    if selected is not None:
        return selected
    return os.environ.get("TENSORGLOT_BACKEND") or DEFAULT_BACKEND


def available_backends() -> list[str]:
    """Names of the installed backends, from entry-point metadata; imports no backend."""
    return _registry.available()


def get_backend(name: str | None = None) -> Backend:
    """The backend called ``name``, or the selected one (see the module docstring for precedence)."""
    return _registry.get(name)


@contextlib.contextmanager
def use(name: str) -> Iterator[Backend]:
    """Select a backend for the enclosed block (per thread and asyncio task)."""
    backend = get_backend(name)  # fail here, not at first use inside the block
    token = _selected.set(name)
    try:
        yield backend
    finally:
        _selected.reset(token)
