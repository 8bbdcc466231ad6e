"""The registry of token-reduction methods (big_vision's `pp/registry.py` and `importlib` of
`models.<name>` patterns).

A method is named in a spec ({"method": ...}), a config, or a command line in one of three ways:

  "tome"                      a registered name (the built-ins, and any method registered so far);
  "my_pkg.my_method"          a module path: the module is imported on first use, and it
                              registers one method (several: name it with ":Name");
  "my_pkg.my_method:Mine"     the same, naming the method by its registered name or class name;
  "path/to/mine.py[:Mine]"    a Python file outside any package, imported the same way.

  @tps_jax.methods.register("mine")
  class Mine(tps_jax.methods.Method): ...

  tps_jax.methods.get("mine")   # the registered instance
  tps_jax.methods.names()       # every registered name, built-ins first
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Callable

from tps_jax.methods.base import Method

_METHODS: dict[str, Method] = {}
_REFERENCES: dict[str, str] = {}  # a module reference already resolved -> its registered name


def register(name: str, *, replace: bool = False) -> Callable[[type], type]:
  """A class decorator: registers an instance of the `Method` subclass under `name`.

  Args:
    name: the name specs use ({"method": name, ...}).
    replace: allow re-registering a name (an error otherwise, so two methods never collide).
  Returns:
    The decorator; it returns the class unchanged (with `name` set).
  """
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"a method name must be an identifier, got {name!r}.")

  def decorate(cls: type) -> type:
    if not (isinstance(cls, type) and issubclass(cls, Method)):
      raise TypeError(f"register({name!r}) decorates a tps_jax.methods.Method subclass, "
                      f"got {cls!r}.")
    known = _METHODS.get(name)
    if known is not None and not replace and not _same_class(type(known), cls):
      raise ValueError(f"method {name!r} is already registered "
                       f"({type(known).__module__}.{type(known).__qualname__}); pass "
                       f"replace=True to replace it.")
    cls.name = name
    _METHODS[name] = cls()
    return cls
  return decorate


def _same_class(a: type, b: type) -> bool:
  """The same class defined again: one file imported both as a script and as a module."""
  return a.__qualname__ == b.__qualname__ and _source(a) == _source(b) is not None


def _source(cls: type) -> str | None:
  module = sys.modules.get(cls.__module__)
  path = getattr(module, "__file__", None)
  return os.path.realpath(path) if path else None


def is_reference(name: str) -> bool:
  """Whether `name` points at a module or file ("pkg.mod", "pkg.mod:Name", "file.py")
  rather than being a registered name."""
  return isinstance(name, str) and ("." in name or ":" in name or "/" in name)


def _import_file(path: pathlib.Path):
  """Imports a Python file by path (once: a file already imported is not run again)."""
  real = os.path.realpath(path)
  for module in list(sys.modules.values()):
    if getattr(module, "__file__", None) and os.path.realpath(module.__file__) == real:
      return module
  name = path.stem if path.stem not in sys.modules else f"_tps_method_{abs(hash(real))}"
  spec = importlib.util.spec_from_file_location(name, real)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def _load(reference: str) -> str:
  """Imports the module a reference names and returns the name its method registered."""
  target, _, attr = reference.partition(":")
  before = set(_METHODS)
  if target.endswith(".py") or "/" in target:
    path = pathlib.Path(target).expanduser()
    if not path.is_file():
      raise ValueError(f"unknown reduction method {reference!r}: no file {str(path)!r} "
                       f"(registered methods: {', '.join(names())}).")
    module = _import_file(path)
  else:
    try:
      module = importlib.import_module(target)
    except ModuleNotFoundError as e:
      if e.name is None or not target.startswith(e.name):
        raise  # the module exists, and one of its own imports is missing
      where = ", ".join(p or "." for p in sys.path[:4])
      raise ValueError(f"unknown reduction method {reference!r}: not a registered name "
                       f"({', '.join(names())}), and no module {target!r} on the Python path "
                       f"({where}, ...).") from None
  # The methods the module defines: registered classes among its attributes.
  found = {obj.name: obj for obj in vars(module).values()
           if isinstance(obj, type) and issubclass(obj, Method) and obj.name
           and obj.__module__ == module.__name__ and obj.name in _METHODS}
  found.update({n: type(_METHODS[n]) for n in set(_METHODS) - before})
  if attr:
    for name, cls in found.items():
      if attr in (name, cls.__name__):
        return name
    raise ValueError(f"unknown reduction method {reference!r}: module {target!r} registers "
                     f"no method {attr!r} (it registers {sorted(found) or 'none'}).")
  if len(found) != 1:
    what = "registers no method" if not found else f"registers {sorted(found)}"
    hint = "" if not found else f"; name one, e.g. '{target}:{sorted(found)[0]}'"
    raise ValueError(f"reduction method {reference!r}: module {target!r} {what}"
                     f"{hint or ' (decorate a Method subclass with tps_jax.methods.register)'}.")
  return next(iter(found))


def resolve(name: str) -> str:
  """The registered name that `name` (a registered name or a module reference) stands for,
  importing the module on first use. Raises ValueError saying where it looked."""
  if not isinstance(name, str):
    raise ValueError(f"a reduction method is named by a string, got {name!r}.")
  if name in _METHODS:
    return name
  if name in _REFERENCES:
    return _REFERENCES[name]
  if not is_reference(name):
    raise ValueError(f"unknown reduction method {name!r}; expected one of {names()}, or a "
                     f"module path such as 'my_pkg.my_method' (docs/extending.md).")
  _REFERENCES[name] = _load(name)
  return _REFERENCES[name]


def get(name: str) -> Method:
  """The method that `name` names: a registered name, or a module reference ("pkg.mod",
  "pkg.mod:Name", "path/to/file.py[:Name]") imported on first use.

  Returns:
    Its `Method` instance. Raises ValueError naming the registered methods, and where it looked,
    if there is none.
  """
  return _METHODS[resolve(name)]


def names() -> tuple[str, ...]:
  """Every registered method's name, in registration order (built-ins first, "none" first)."""
  return tuple(_METHODS)
