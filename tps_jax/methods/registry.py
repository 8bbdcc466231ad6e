"""The registry of token-reduction methods, by name (big_vision's `pp/registry.py` pattern).

  @tps_jax.methods.register("mine")
  class Mine(tps_jax.methods.Method): ...

  tps_jax.methods.get("mine")   # the registered instance
  tps_jax.methods.names()       # every registered name, built-ins first
"""

from __future__ import annotations

from typing import Callable

from tps_jax.methods.base import Method

_METHODS: dict[str, Method] = {}


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
    if name in _METHODS and not replace:
      raise ValueError(f"method {name!r} is already registered "
                       f"({type(_METHODS[name]).__qualname__}); pass replace=True to replace it.")
    cls.name = name
    _METHODS[name] = cls()
    return cls
  return decorate


def get(name: str) -> Method:
  """The method registered as `name`.

  Returns:
    Its `Method` instance. Raises ValueError naming the registered methods if there is none.
  """
  try:
    return _METHODS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown reduction method {name!r}; expected one of {names()}.") from None


def names() -> tuple[str, ...]:
  """Every registered method's name, in registration order (built-ins first, "none" first)."""
  return tuple(_METHODS)
