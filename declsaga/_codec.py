"""The JSON codec of durable execution: fields and results as readable, tagged JSON.

JSON-native values stay themselves. Everything else is an object with exactly one key
starting with "$", the tag, plus plain keys of its own (the fields of an attrs value,
the zone of a datetime):

    [1, 2]                                    a list
    {"$tuple": [1, 2]}                        a tuple
    {"$float": "nan"}                         nan, inf, -inf and -0.0 (JSON has none of them)
    {"$int": "0x1f..."}                       an int too long for JSON's decimal digits
    {"$dict": [[1, "a"], ["$x", "b"]]}        a dict with a key that is not a plain str
    {"$datetime": "2024-03-31T12:00:00+02:00", "tz": "Europe/Paris", "fold": 1}
    {"$date": "2024-03-31"}
    {"$uuid": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"}
    {"$decimal": "1.10"}
    {"$enum": "shop.models:Color", "name": "RED"}
    {"$attrs": "shop.models:Line", "sku": "A-1", "quantity": 2}

A dict whose str keys start with "$" is written as "$dict" pairs, so no plain dict is
ever read back as a tag. Classes are found again by "module:qualname" in `sys.modules`
and never imported: a stored name must not run code that was not already loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import UTC, date, datetime, timezone
from decimal import Decimal
from enum import Enum, Flag
from functools import reduce
from math import copysign, isnan
from operator import or_
from typing import Any, TypeAlias
from uuid import UUID
from zoneinfo import ZoneInfo

import attrs

__all__ = [
    "JSON",
    "Undecodable",
    "Unencodable",
    "apply_fields",
    "decode",
    "encode",
    "encode_fields",
    "instance_from_fields",
    "lookup",
    "type_name",
]

# A JSON-compatible value: dict (str keys), list, str, int, float, bool or None, nested.
JSON: TypeAlias = Any

# Python refuses to print ints longer than 4300 digits (sys.int_max_str_digits), so
# longer ones are stored in hex, which has no such limit. 2**4096 has 1234 digits.
_BIG_INT = 1 << 4096
# attrs keeps a cache_hash class's hash in this slot; __init__ sets it to None.
_HASH_CACHE = "_attrs_cached_hash"
_FACTORY: Any = type(attrs.Factory(list))
_CONVERTER: Any = attrs.Converter


class Unencodable(Exception):
    """A value the codec cannot store; the executor turns it into `EncodeError`."""

    def __init__(self, type_name: str, reason: str, path: str = "") -> None:
        super().__init__(type_name, reason, path)
        self.path = path  # where in the value: "['items'][2]", ".field", "" for the value
        self.type_name = type_name  # module.Qualname of the offending value's type
        self.reason = reason

    def under(self, segment: str) -> Unencodable:
        """Prefix the path while the error travels up out of a container."""
        self.path = segment + self.path
        self.args = (self.type_name, self.reason, self.path)
        return self

    def __str__(self) -> str:
        return f"{self.path or 'the value'} holds a {self.type_name}: {self.reason}"


class Undecodable(Exception):
    """Stored data the codec cannot rebuild; the store turns it into `StoreError`."""


def type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lookup(module: str, qualname: str) -> object | None:
    """The object at `module:qualname` if that module is already imported, else None.

    Walks namespaces (`vars`), not attributes: a module `__getattr__` may import lazily,
    and stored data must never cause an import or run a descriptor.
    """
    found: object = sys.modules.get(module)
    for part in qualname.split("."):
        if found is None:
            return None
        try:
            found = vars(found).get(part)
        except TypeError:  # an object without a __dict__
            return None
    return found


# --- encoding ---


def encode(value: object) -> JSON:
    """`value` as JSON that `json.dumps(..., allow_nan=False)` accepts; else `Unencodable`."""
    try:
        return _encode(value)
    except RecursionError:
        raise Unencodable(
            type_name(type(value)), "it nests too deeply, or contains itself"
        ) from None


def _encode(value: Any) -> JSON:
    # Exact types only (`type(value) is`), which also keeps bool apart from int and
    # refuses subclasses; the JSON-native types come first: they are most values.
    cls = type(value)
    if cls is str or cls is bool or value is None:
        return value
    if cls is int:
        return value if -_BIG_INT < value < _BIG_INT else {"$int": hex(value)}
    if cls is float:
        if value != 0.0 and value - value == 0.0:  # finite and not ±0.0: JSON keeps it
            return value
        return _encode_float(value)
    if cls is list:
        return _encode_items(value)
    if cls is dict:
        return _encode_dict(value)
    encoder = _ENCODERS.get(cls)
    if encoder is not None:
        return encoder(value)
    if isinstance(value, Enum):
        return _encode_enum(value)
    if "__attrs_attrs__" in cls.__dict__:
        return _encode_attrs(value, cls)
    raise _refusal(value)


def _encode_float(value: float) -> JSON:
    if isnan(value):
        return {"$float": "nan"}  # every NaN becomes float("nan"): sign and payload are lost
    if value == 0.0:
        return value if copysign(1.0, value) > 0 else {"$float": "-0.0"}
    return {"$float": "inf" if value > 0 else "-inf"}


def _encode_items(value: list[object] | tuple[object, ...]) -> list[JSON]:
    out: list[JSON] = []
    append = out.append
    try:
        for item in value:
            append(_encode(item))
    except Unencodable as error:
        raise error.under(f"[{len(out)}]") from None  # len(out): the failing item's index
    return out


def _encode_dict(value: dict[Any, object]) -> JSON:
    out: dict[str, JSON] = {}
    items = iter(value.items())
    key: object = None
    try:
        for key, item in items:
            if type(key) is str and key[:1] != "$":
                out[key] = _encode(item)
                continue
            # Not a plain object after all: continue as pairs, keeping what is done.
            pairs = [[done_key, done] for done_key, done in out.items()]
            pairs.append([_encode_key(key), _encode(item)])
            for key, item in items:  # noqa: PLW2901  # the same iterator, resumed
                pairs.append([_encode_key(key), _encode(item)])
            return {"$dict": pairs}
    except Unencodable as error:
        raise error.under(f"[{key!r}]") from None
    return out


def _encode_key(key: object) -> JSON:
    try:
        return _encode(key)
    except Unencodable as error:
        error.reason = f"the dict key {key!r}: {error.reason}"
        raise


def _encode_tuple(value: tuple[object, ...]) -> JSON:
    return {"$tuple": _encode_items(value)}


def _encode_datetime(value: datetime) -> JSON:
    zone = value.tzinfo
    out: dict[str, JSON] = {"$datetime": value.isoformat()}
    if zone is None or zone is UTC:
        pass
    elif type(zone) is ZoneInfo:
        if zone.key is None:
            raise Unencodable(
                "datetime.datetime",
                "its ZoneInfo has no key (built from a file); use ZoneInfo(key)",
            )
        out["tz"] = zone.key  # the zone, not just today's offset: arithmetic stays right
    elif type(zone) is timezone:
        name = zone.tzname(None)
        if name != timezone(value.utcoffset()).tzname(None):  # type: ignore[arg-type]
            out["tzname"] = name
    else:
        raise Unencodable(
            "datetime.datetime",
            f"its tzinfo is a {type_name(type(zone))}; use a zoneinfo.ZoneInfo or a "
            "datetime.timezone",
        )
    if value.fold:
        out["fold"] = 1
    return out


def _encode_enum(value: Enum) -> JSON:
    cls = type(value)
    ref = _class_ref(cls)
    name = value._name_
    # A combination of flags is named "A|B"; one without a name (an empty flag, or
    # unnamed bits) is stored by value.
    if isinstance(value, Flag) and (name is None or _flag(cls, name) != value):
        return {"$enum": ref, "value": _encode(value._value_)}
    return {"$enum": ref, "name": name}


def _flag(cls: Any, name: str) -> object:
    """The flag named `name`, "A|B" for a combination; None if a part has no member."""
    members = cls.__members__
    if not all(part in members for part in name.split("|")):
        return None
    return reduce(or_, (members[part] for part in name.split("|")))


def _encode_attrs(value: object, cls: type) -> JSON:
    out: dict[str, JSON] = {"$attrs": _class_ref(cls)}
    for field in cls.__attrs_attrs__:  # type: ignore[attr-defined]
        name = field.name
        try:
            item = getattr(value, name)
        except AttributeError:  # an init=False field without a default, never set
            raise Unencodable(type_name(cls), "the attrs field is not set", "." + name) from None
        try:
            out[name] = _encode(item)
        except Unencodable as error:
            raise error.under("." + name) from None
    return out


# Module-level classes found again under their name: the ref, and the namespace and
# name to check on each use (a class statement run again, by a reload or a test,
# replaces the class under its name, and the stored name must find this class).
_REFS: dict[type, tuple[str, Mapping[str, object], str]] = {}


def _class_ref(cls: type) -> str:
    cached = _REFS.get(cls)
    if cached is not None and cached[1].get(cached[2]) is cls:
        return cached[0]
    module, qualname = cls.__module__, cls.__qualname__
    if "<locals>" in qualname:
        raise Unencodable(
            type_name(cls),
            "its class is defined inside a function; only module-level classes can be "
            "found again when the journal is read",
        )
    ref = f"{module}:{qualname}"
    outer, _, name = qualname.rpartition(".")
    parent = lookup(module, outer) if outer else sys.modules.get(module)
    try:
        namespace: Mapping[str, object] = vars(parent)
    except TypeError:  # None, or an object without a namespace
        namespace = {}
    if namespace.get(name) is not cls:
        raise Unencodable(
            type_name(cls),
            f"its class is not the one found under its name, {ref}; only module-level "
            "classes can be found again when the journal is read",
        )
    _REFS[cls] = (ref, namespace, name)
    return ref


_SUPPORTED = (str, int, float, list, tuple, dict, datetime, date, UUID, Decimal)


def _refusal(value: object) -> Unencodable:
    cls = type(value)
    name = type_name(cls)
    base = next((base for base in _SUPPORTED if isinstance(value, base)), None)
    if base is not None:
        reason = (
            f"it is a subclass of {base.__qualname__}, and only exact types are stored; "
            f"convert it, e.g. {base.__qualname__}(value)"
        )
    elif isinstance(value, set | frozenset):
        reason = "sets are not stored; use a list or a tuple"
    elif isinstance(value, bytes | bytearray | memoryview):
        reason = "bytes are not stored; store text, e.g. base64"
    elif attrs.has(cls):
        reason = (
            "its class inherits attrs fields without being an attrs class itself; "
            "decorate it with @attrs.define"
        )
    else:
        reason = "it is not a type the journal stores"
    return Unencodable(name, reason)


_ENCODERS: dict[type, Any] = {
    tuple: _encode_tuple,
    datetime: _encode_datetime,
    date: lambda value: {"$date": value.isoformat()},
    UUID: lambda value: {"$uuid": str(value)},
    Decimal: lambda value: {"$decimal": str(value)},  # str() round-trips every Decimal
}


# --- decoding ---


def decode(data: JSON) -> object:
    """The value that `encode` turned into `data`; `Undecodable` if it cannot be rebuilt."""
    try:
        return _decode(data)
    except Undecodable:
        raise
    except (
        TypeError,
        ValueError,
        LookupError,
        AttributeError,
        ArithmeticError,  # decimal.InvalidOperation
        RecursionError,
    ) as error:
        # Malformed data: a tag holding the wrong kind of value, a bad date, ...
        raise Undecodable(f"malformed stored value: {type(error).__name__}: {error}") from error


def _decode(data: JSON) -> object:
    cls = type(data)
    if cls is str or cls is int or cls is float or cls is bool or data is None:
        return data
    if cls is list:
        return [_decode(item) for item in data]
    if cls is dict:
        for key in data:
            if key[:1] == "$":
                return _decode_tagged(key, data)
        return {key: _decode(item) for key, item in data.items()}
    raise Undecodable(f"a {type_name(cls)} is not JSON")


def _decode_tagged(tag: str, data: dict[str, JSON]) -> object:
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise Undecodable(f"unknown tag {tag!r} in {data!r}")
    if len(data) > 1 and tag not in _OPEN_TAGS:
        raise Undecodable(f"unexpected keys with tag {tag!r} in {data!r}")
    return decoder(data[tag], data)


def _decode_float(text: str, data: object) -> float:
    if text not in ("nan", "inf", "-inf", "-0.0"):
        raise Undecodable(f"malformed {{'$float': {text!r}}}")
    return float(text)


def _decode_dict(pairs: object, data: object) -> dict[object, object]:
    if type(pairs) is not list:
        raise Undecodable(f"malformed stored value {data!r}")
    out: dict[object, object] = {}
    for pair in pairs:
        if type(pair) is not list or len(pair) != 2:
            raise Undecodable(f"malformed key-value pair {pair!r} in a stored dict")
        out[_decode(pair[0])] = _decode(pair[1])
    return out


_DATETIME_KEYS = frozenset({"tz", "tzname", "fold"})


def _decode_datetime(text: str, data: dict[str, JSON]) -> datetime:
    value = datetime.fromisoformat(text)
    if len(data) == 1:
        return value
    if not data.keys() - {"$datetime"} <= _DATETIME_KEYS:
        raise Undecodable(f"unexpected keys in {data!r}")
    if "tz" in data:
        value = value.replace(tzinfo=ZoneInfo(data["tz"]))  # keeps the wall time
    elif "tzname" in data:
        value = value.replace(tzinfo=timezone(value.utcoffset(), data["tzname"]))  # type: ignore[arg-type]
    fold = data.get("fold", 0)
    if fold not in (0, 1):
        raise Undecodable(f"malformed fold in {data!r}")
    return value.replace(fold=fold) if fold else value


def _decode_enum(ref: str, data: dict[str, JSON]) -> Enum:
    cls = _find_class(ref)
    if not (isinstance(cls, type) and issubclass(cls, Enum)):
        raise Undecodable(f"{ref} is no longer an Enum class")
    if data.keys() == {"$enum", "name"}:
        name = data["name"]
        if not isinstance(name, str):
            raise Undecodable(f"malformed enum member name in {data!r}")
        member: Any = cls.__members__.get(name)
        if member is None and issubclass(cls, Flag):
            member = _flag(cls, name)
        if member is None:
            raise Undecodable(f"{ref} has no member named {name!r}")
        return member  # type: ignore[no-any-return]
    if data.keys() == {"$enum", "value"} and issubclass(cls, Flag):
        return cls(_decode(data["value"]))
    raise Undecodable(f"malformed enum member {data!r}")


def _decode_attrs(ref: str, data: dict[str, JSON]) -> object:
    cls = _find_class(ref)
    if not (isinstance(cls, type) and "__attrs_attrs__" in cls.__dict__):
        raise Undecodable(f"{ref} is no longer an attrs class")
    return _build(cls, {name: _decode(item) for name, item in data.items() if name != "$attrs"})


def _find_class(ref: object) -> object:
    if not isinstance(ref, str) or ":" not in ref:
        raise Undecodable(f"malformed class reference {ref!r}")
    module, _, qualname = ref.partition(":")
    if module not in sys.modules:
        raise Undecodable(
            f"class {ref} cannot be found: module {module} is not imported (the journal "
            "never imports modules; import it before reading)"
        )
    found = lookup(module, qualname)
    if found is None:
        raise Undecodable(f"class {ref} cannot be found: module {module} has no {qualname}")
    return found


def _text(parse: Any) -> Any:
    """A decoder for a tag that holds a string (Decimal(1.5) must not pass as stored)."""

    def decoder(text: object, data: object) -> object:
        if type(text) is not str:
            raise Undecodable(f"malformed stored value {data!r}")
        return parse(text)

    return decoder


def _decode_tuple(items: object, data: object) -> tuple[object, ...]:
    if type(items) is not list:
        raise Undecodable(f"malformed stored value {data!r}")
    return tuple([_decode(item) for item in items])


_DECODERS: dict[str, Any] = {
    "$tuple": _decode_tuple,
    "$float": _decode_float,
    "$int": _text(lambda text: int(text, 16)),
    "$dict": _decode_dict,
    "$datetime": _decode_datetime,
    "$date": _text(date.fromisoformat),
    "$uuid": _text(UUID),
    "$decimal": _text(Decimal),
    "$enum": _decode_enum,
    "$attrs": _decode_attrs,
}
# The tags that hold keys of their own; every other tag is alone in its object.
_OPEN_TAGS = frozenset({"$datetime", "$enum", "$attrs"})


# --- attrs instances and saga fields ---


def _build(cls: type, values: dict[str, object]) -> object:
    """An instance of attrs class `cls` holding `values`, built without `__init__`.

    Validators, converters of given values and `__attrs_post_init__` do not run: the
    values were valid when stored. A field missing from `values` takes its default.
    """
    fields = cls.__attrs_attrs__  # type: ignore[attr-defined]
    unknown = values.keys() - {field.name for field in fields}
    if unknown:
        raise Undecodable(
            f"stored field {sorted(unknown)[0]!r} is not a field of {type_name(cls)} any more"
        )
    try:
        # object.__new__, not cls.__new__: Saga subclasses override __new__.
        instance: Any = object.__new__(cls)
    except TypeError as error:
        raise Undecodable(f"{type_name(cls)} cannot be rebuilt: {error}") from error
    setter = object.__setattr__  # bypasses frozen classes' __setattr__
    for field in fields:
        name = field.name
        if name in values:
            setter(instance, name, values[name])
            continue
        default: Any = field.default
        if default is attrs.NOTHING:
            if field.init:
                raise Undecodable(
                    f"field {name!r} of {type_name(cls)} was not stored and has no default"
                )
            continue  # as after __init__: an init=False field without a default is unset
        try:
            if isinstance(default, _FACTORY):
                factory: Any = default.factory
                default = factory(instance) if default.takes_self else factory()
            default = _convert(field, default, instance)
        except Exception as error:  # user code: the caller expects Undecodable
            raise Undecodable(
                f"the default of field {name!r} of {type_name(cls)} failed: {error!r}"
            ) from error
        setter(instance, name, default)
    hash_method = getattr(cls.__hash__, "__code__", None)
    if hash_method is not None and _HASH_CACHE in hash_method.co_names:
        setter(instance, _HASH_CACHE, None)  # what __init__ of a cache_hash class does
    return instance


def _convert(field: attrs.Attribute[Any], value: object, instance: object) -> object:
    # __init__ converts defaults too, so a default takes the shape the class declares.
    converter: Any = field.converter
    if converter is None:
        return value
    if isinstance(converter, _CONVERTER):
        args: list[object] = [value]
        if converter.takes_self:
            args.append(instance)
        if converter.takes_field:
            args.append(field)
        return converter.converter(*args)
    return converter(value)


def encode_fields(instance: object) -> dict[str, JSON]:
    """Every attrs field of `instance`, by name; `Unencodable` with a path like "items[2]"."""
    out: dict[str, JSON] = {}
    for field in type(instance).__attrs_attrs__:  # type: ignore[attr-defined]
        name = field.name
        try:
            item = getattr(instance, name)
        except AttributeError:  # an init=False field without a default, never set
            raise Unencodable(type_name(type(instance)), "the field is not set", name) from None
        try:
            out[name] = _encode(item)
        except Unencodable as error:
            raise error.under(name) from None
        except RecursionError:
            raise Unencodable(
                type_name(type(instance)), "it nests too deeply, or contains itself", name
            ) from None
    return out


def _decode_fields(cls: type, data: dict[str, JSON]) -> dict[str, object]:
    names = {field.name for field in cls.__attrs_attrs__}  # type: ignore[attr-defined]
    values: dict[str, object] = {}
    for name, item in data.items():
        if name not in names:
            raise Undecodable(f"stored field {name!r} is not a field of {type_name(cls)} any more")
        try:
            values[name] = decode(item)
        except Undecodable as error:
            raise Undecodable(f"field {name!r} of {type_name(cls)}: {error}") from error
    return values


_ABSENT = object()


def apply_fields(instance: object, data: dict[str, JSON]) -> None:
    """Set the fields stored in `data` on `instance`; the others keep their values.

    All fields are decoded before any is set, so a failure leaves `instance` unchanged.
    """
    setter = object.__setattr__
    for name, value in _decode_fields(type(instance), data).items():
        current = getattr(instance, name, _ABSENT)
        # Lists and dicts are updated in place: code may hold one across a replayed
        # `ctx.run` (`self.items.append(ctx.run(...))`), and must see the restored state.
        if type(current) is list and type(value) is list:
            current[:] = value
        elif type(current) is dict and type(value) is dict:
            current.clear()
            current.update(value)
        else:
            setter(instance, name, value)


def instance_from_fields(cls: type, data: dict[str, JSON]) -> Any:
    """A new `cls` holding the fields stored in `data`, built without `__init__`."""
    return _build(cls, _decode_fields(cls, data))
