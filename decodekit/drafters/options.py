"""Method options: what each option may hold, declared next to it, and the one check every front door shares.

A method's options are its drafter's constructor keywords after ``target``; each carries its kind and bounds::

    def __init__(self, target: TargetInfo, k: Annotated[int, Range(1, 64)] = 8, seed_prompt: bool = True)

- ``Range(low, high)``: an int or float (the annotated type) in ``[low, high]``; ``OperatorRange`` the same, never
  set by a server client;
- ``Choice(words, count)``: one of ``words``, or an integer in the ``count`` range;
- ``FilePath(max_bytes)``: a regular file the drafter reads, at most ``max_bytes`` (never set by a server client);
- ``ModelPath()``: a checkpoint directory or a GGUF file the drafter runs (never set by a server client);
- ``LayerSet()``: layer indices joined by ``/``, ranges allowed (``4-9/12``);
- ``Methods(max_parts)``: method specs joined by ``+`` (never set by a server client);
- a plain ``bool`` needs nothing more;
- ``Renamed(old)`` beside the kind: the option's former name, still accepted for one release, with a warning.

So every option that sizes memory or work is bounded. :func:`decodekit.drafters.parse_method` checks a spec for
the library, the CLI, the bench and the server alike, and a class marked :func:`checked_options` makes the same
check when code builds it directly. A :class:`MethodPolicy` says who may set what: the
operator (library, CLI, bench) everything; a server's clients only what its flags allow. Error messages quote a
caller's values clipped (:func:`decodekit.errors.clip`), and never a file's contents.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from decodekit.errors import InvalidParameter, clip

T = TypeVar("T")


class Kind:
    """What an option holds. ``client_settable``: a server client may set it when the operator allows options."""

    client_settable: ClassVar[bool] = True

    def parse(self, raw: str, base: type) -> object:
        """The option's value from its spec text (``base``: the annotated type); ValueError says why not."""
        raise NotImplementedError

    def check(self, value: object) -> None:
        """Raise ValueError unless ``value`` (already of the option's type) is allowed."""

    def describe(self) -> str:
        """The allowed values, for messages and ``--help``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Kind):
    """A number in ``[low, high]``."""

    low: float
    high: float

    def parse(self, raw: str, base: type) -> object:
        try:
            return base(raw)
        except ValueError:
            raise ValueError(f"expects {TYPES[base][1]}") from None

    def check(self, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("expects a finite number")
        if not self.low <= value <= self.high:
            raise ValueError(f"must be in {self.describe()}")

    def describe(self) -> str:
        return f"[{self.low}, {self.high}]"


@dataclass(frozen=True)
class OperatorRange(Range):
    """A number in ``[low, high]`` that only the operator sets, never a server client (it changes what every
    request of the process shares)."""

    client_settable: ClassVar[bool] = False


@dataclass(frozen=True)
class Choice(Kind):
    """One of ``words``, or (with ``count``) an integer in that range, given as text."""

    words: tuple[str, ...]
    count: Range | None = None

    def parse(self, raw: str, base: type) -> object:
        return raw

    def check(self, value: object) -> None:
        if value in self.words:
            return
        if self.count is not None and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            self.count.check(int(value))
            return
        raise ValueError(f"must be {self.describe()}")

    def describe(self) -> str:
        return " or ".join(
            [*map(repr, self.words), *([f"an integer in {self.count.describe()}"] if self.count else [])]
        )


class OptionalText(Kind):
    """Text that may be left empty (""); any other value is a string that :meth:`check_text` accepts."""

    expects: ClassVar[str] = "text"  # what the message of a value that is no string says the option expects

    def parse(self, raw: str, base: type) -> object:
        return raw

    def check(self, value: object) -> None:
        if value == "":
            return
        if not isinstance(value, str):
            raise ValueError(f"expects {self.expects}")
        self.check_text(value)

    def check_text(self, value: str) -> None:
        """Raise ValueError unless ``value`` (not empty) is allowed."""
        raise NotImplementedError


@dataclass(frozen=True)
class FilePath(OptionalText):
    """A regular file the drafter reads once, of at most ``max_bytes`` ("" = none). Devices, FIFOs and /proc files
    are refused, so a read can neither block nor run forever."""

    max_bytes: int
    client_settable: ClassVar[bool] = False
    expects: ClassVar[str] = "a path"

    def check_text(self, value: str) -> None:
        check_regular_file(value, self.max_bytes)

    def describe(self) -> str:
        return f"a regular file of at most {self.max_bytes} bytes"


@dataclass(frozen=True)
class ModelPath(OptionalText):
    """A model the drafter loads: a checkpoint directory (with ``config.json``) or a ``.gguf`` file ("" = none).
    Never set by a server client."""

    client_settable: ClassVar[bool] = False
    expects: ClassVar[str] = "a path"

    def check_text(self, value: str) -> None:
        path = os.path.expanduser(value)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ValueError("is a directory without config.json")
        elif not path.endswith(".gguf") or not os.path.isfile(path):
            raise ValueError("is neither a checkpoint directory nor a .gguf file")

    def describe(self) -> str:
        return "a checkpoint directory or a .gguf file"


@dataclass(frozen=True)
class LayerSet(OptionalText):
    """Layer indices joined by ``/``, ranges allowed: ``4-9/12`` ("" = none given), naming at most ``most``."""

    MAX_LAYER: ClassVar[int] = 1023
    expects: ClassVar[str] = "layer indices such as 4-9/12"
    most: int = MAX_LAYER + 1

    def check_text(self, value: str) -> None:
        if len(LayerSet.layers(value)) > self.most:
            raise ValueError(f"names at most {self.most} layers")

    @staticmethod
    def layers(value: str) -> list[int]:
        """The sorted distinct indices ``value`` names; ValueError when it is malformed."""
        found: set[int] = set()
        for part in value.split("/"):
            first, dash, last = part.strip().partition("-")
            if not first.isdigit() or (dash and not last.isdigit()):
                raise ValueError(f"expects {LayerSet.expects}")
            low, high = int(first), int(last) if dash else int(first)
            if not low <= high <= LayerSet.MAX_LAYER:
                raise ValueError(f"expects ranges low-high within 0-{LayerSet.MAX_LAYER}")
            found.update(range(low, high + 1))
        return sorted(found)

    def describe(self) -> str:
        most = f", at most {self.most}" if self.most <= LayerSet.MAX_LAYER else ""
        return f"layer indices joined by '/', ranges allowed (4-9/12){most}"


@dataclass(frozen=True)
class Methods(Kind):
    """Up to ``max_parts`` method specs joined by ``+`` (each checked as a spec of its own)."""

    max_parts: int
    client_settable: ClassVar[bool] = False

    def parse(self, raw: str, base: type) -> object:
        return raw

    def check(self, value: object) -> None:
        from decodekit.drafters import parse_method  # the registry imports this module

        if not isinstance(value, str):
            raise ValueError("expects method specs joined by '+'")
        parts = [part for part in value.split("+") if part]
        if not 2 <= len(parts) <= self.max_parts:
            raise ValueError(f"must join 2 to {self.max_parts} methods with '+', got {len(parts)}")
        for part in parts:
            parse_method(part)

    def describe(self) -> str:
        return f"2 to {self.max_parts} method specs joined by '+'"


@dataclass(frozen=True)
class Renamed:
    """An option's former name: accepted for one release, with a FutureWarning that names the new one."""

    old: str


BOOL = "true/false"
TYPES = {bool: ((bool,), BOOL), int: ((int,), "an integer"), float: ((int, float), "a number"), str: ((str,), "text")}


def check_regular_file(path: str, max_bytes: int) -> None:
    """Raise ValueError unless ``path`` is a readable regular file of at most ``max_bytes``. The message says
    why, naming neither the path nor anything in the file."""
    try:
        _check_stat(os.stat(path), max_bytes)
    except (OSError, ValueError) as err:
        raise ValueError(str(err) if isinstance(err, ValueError) else "is not readable") from None
    if not os.access(path, os.R_OK):
        raise ValueError("is not readable")


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of ``path``, checked as by :func:`check_regular_file` on the open file itself (so a path swapped
    for a FIFO or a device after the check can neither block nor stream forever), and refused when it reads
    other than its stated size (pseudo-files such as /proc's)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (OSError, ValueError):
        raise ValueError("is not readable") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        _check_stat(info, max_bytes)
        data = file.read(info.st_size + 1)
    if len(data) != info.st_size:  # a pseudo-file (/proc, /sys) reads other than its stated size
        raise ValueError("is not a regular file")
    return data


def _check_stat(info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("is not a regular file")
    if info.st_size > max_bytes:
        raise ValueError(f"holds {info.st_size} bytes, more than the {max_bytes} allowed")


@dataclass(frozen=True)
class Option:
    """One constructor option: its name, type, default, kind (None for a bool) and former names."""

    name: str
    base: type
    default: object
    kind: Kind | None
    former: tuple[str, ...] = ()

    @property
    def client_settable(self) -> bool:
        return self.kind is None or self.kind.client_settable

    def describe(self) -> str:
        return BOOL if self.kind is None else self.kind.describe()

    def parse(self, raw: str) -> object:
        """The value of spec text ``raw``, checked (ValueError says why not)."""
        if self.kind is None:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expects {BOOL}")
        value = self.kind.parse(raw, self.base)
        self.check(value)
        return value

    def check(self, value: object) -> None:
        """Raise ValueError unless ``value`` is of the option's type and allowed by its kind."""
        kinds, what = TYPES[self.base]
        if not isinstance(value, kinds) or (isinstance(value, bool) and self.base is not bool):
            raise ValueError(f"expects {what}")
        if self.kind is not None:
            self.kind.check(value)


@cache
def options_of(cls: type) -> dict[str, Option]:
    """The options of a drafter class, by name. Raises TypeError for an option with neither a bool type nor a
    declared kind (a method cannot forget its bounds)."""
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    hints = get_type_hints(init, include_extras=True)
    found: dict[str, Option] = {}
    for param in list(inspect.signature(init).parameters.values())[2:]:
        hint: Any = hints.get(param.name)
        marks = get_args(hint)[1:] if get_origin(hint) is Annotated else ()
        kinds = [a for a in marks if isinstance(a, Kind)]
        former = tuple(a.old for a in marks if isinstance(a, Renamed))
        base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
        if base is bool and not kinds:
            found[param.name] = Option(param.name, bool, param.default, None, former)
        elif len(kinds) == 1 and base in (int, float, str):
            found[param.name] = Option(param.name, base, param.default, kinds[0], former)
        else:
            raise TypeError(f"{cls.__name__} option {param.name} declares no kind (Range, Choice, FilePath, ...)")
    return found


def current_name(known: dict[str, Option], key: str, method: str) -> str:
    """``key``, or the option of ``known`` it names by a former name (with a FutureWarning)."""
    for option in known.values():
        if key in option.former:
            message = f"option {key} of {method} is now called {option.name}; the old name goes in the next release"
            warnings.warn(message, FutureWarning, stacklevel=4)
            return option.name
    return key


def checked_options(cls: type[T]) -> type[T]:
    """Class decorator for a drafter: its constructor checks every option against its declared kind, so code
    that builds the class directly gets the same InvalidParameter as a method spec would."""
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self: object, *args: object, **kwargs: object) -> None:
        owner = type(self).__name__  # a subclass that inherits the constructor is named in messages
        kwargs = {current_name(options_of(cls), key, owner): value for key, value in kwargs.items()}
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        for name, value in list(bound.arguments.items())[2:]:
            try:
                options_of(cls)[name].check(value)
            except ValueError as err:
                raise InvalidParameter(f"{owner} option {name}: {clip(value)} {err}") from None
        init(self, *args, **kwargs)

    cls.__init__ = checked_init  # type: ignore[method-assign]
    return cls


@dataclass(frozen=True)
class MethodPolicy:
    """Who may set what in a method spec. ``methods``: the method names allowed (None: all). ``options``: options
    may be set at all. ``operator``: also options that name files or other methods (a server's clients never)."""

    methods: frozenset[str] | None = None
    options: bool = True
    operator: bool = True


OPERATOR = MethodPolicy()  # the library, the CLI and the bench: any method, any option within its bounds
CLIENT = MethodPolicy(options=False, operator=False)  # a server's default for its clients: a method by name only


def parse_spec(
    spec: str,
    registry: dict[str, type],
    noun: str,
    policy: MethodPolicy = OPERATOR,
    example: str = "",
    declared: Callable[[type], dict[str, Option]] = options_of,
) -> tuple[type, dict[str, object]]:
    """``"name:key=value,..."`` -> (the class ``registry`` holds under name, its checked keyword options): every
    option known, settable under ``policy``, of its type and within its declared bounds. ``noun`` names what a
    spec picks in messages ("method", "strategy", "attention"); ``declared`` gives a class's options (default: its
    constructor's keywords after the first, :func:`options_of`)."""
    if not isinstance(spec, str):
        raise InvalidParameter(f"a {noun} spec is a string such as {example!r}, got {type(spec).__name__}")
    name, _, options = spec.strip().partition(":")
    if name not in registry:
        raise InvalidParameter(f"unknown {noun} {clip(name)}; available: {', '.join(registry)}")
    cls = registry[name]
    known = declared(cls)
    kwargs: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        if not policy.options:
            raise InvalidParameter(f"this server lets requests name a {noun}, not set its options ({clip(item)})")
        key, eq, raw = (part.strip() for part in item.partition("="))
        key = current_name(known, key, f"{noun} {name}")
        option = known.get(key)
        if not eq or option is None:
            raise InvalidParameter(f"bad option {clip(item)} for {noun} {name} (options: {', '.join(known) or 'none'})")
        if not (policy.operator or option.client_settable):
            raise InvalidParameter(f"option {key} of {noun} {name} can be set by the server's operator only")
        try:
            kwargs[key] = option.parse(raw)
        except ValueError as err:
            raise InvalidParameter(f"option {key} of {noun} {name}: {clip(raw)} {err}") from None
    return cls, kwargs
