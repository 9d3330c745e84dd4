"""SPEC §8 "Codec" and "Recorded errors": the journal's JSON codec."""

from __future__ import annotations

import asyncio
import collections
import enum
import json
import math
import sys
import types
import uuid
import zoneinfo
from collections import Counter, OrderedDict, defaultdict, namedtuple
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any, cast

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from declsaga import Saga, step
from declsaga._codec import (
    Undecodable,
    Unencodable,
    apply_fields,
    decode,
    encode,
    encode_fields,
    instance_from_fields,
)
from declsaga._errors import (
    ActionNotFound,
    AggregateNotFound,
    CompensationFailed,
    CompensationTimeout,
    EmptyActionName,
    EncodeError,
    MissingBus,
    RecordedError,
    SagaError,
)
from declsaga._recorded import decode_error, encode_error

MOD = __name__
CALLS: Counter[str] = Counter()
HAS_PARIS = "Europe/Paris" in zoneinfo.available_timezones()
needs_paris = pytest.mark.skipif(not HAS_PARIS, reason="no Europe/Paris in the tz database")
PARIS = zoneinfo.ZoneInfo("Europe/Paris") if HAS_PARIS else None


# --- module-level classes the codec can find again ---


class Color(enum.Enum):
    RED = 1
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(enum.StrEnum):
    FAST = "fast"


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


class Bits(enum.IntFlag):
    A = 1
    B = 2


class Outer:
    class Inner(enum.Enum):  # a nested class: found by its qualified name
        ONE = 1


def _count(instance: Any, attribute: Any, value: Any) -> None:
    CALLS["validator"] += 1


def _plus_one(value: int) -> int:
    CALLS["converter"] += 1
    return value + 1


@attrs.frozen
class Point:
    x: int
    y: int = 0


@attrs.define(slots=False)
class Loose:
    a: object
    b: object = None


@attrs.define
class Pair:
    left: object
    right: object = None


@attrs.define
class Checked:
    value: int = attrs.field(validator=_count)
    derived: int = attrs.field(init=False, default=0)
    _secret: str = attrs.field(default="s", alias="secret")
    converted: int = attrs.field(default=7, converter=_plus_one)

    def __attrs_post_init__(self) -> None:
        CALLS["post_init"] += 1
        self.derived = self.value * 2


@attrs.frozen(cache_hash=True)
class HashKey:
    name: str


@attrs.define
class Fragile:
    items: list[int] = attrs.field(factory=lambda: [1 // 0])


class Status(enum.Enum):
    NEW = "new"
    PAID = "paid"


class Order(Saga):
    order_id: str
    amount: int = attrs.field(default=0, validator=_count)
    lines: list[Point] = attrs.field(factory=list)
    note: str = attrs.field(
        default=attrs.Factory(lambda self: f"order {self.order_id}", takes_self=True)
    )
    status: Status = Status.NEW
    placed: datetime | None = None

    def __attrs_post_init__(self) -> None:
        CALLS["post_init"] += 1

    @step(order=1)
    def place(self, ctx: object) -> None:
        self.status = Status.PAID


class Fine(Exception):
    """A user error that `Fine(*args)` rebuilds."""


class Custom(Exception):
    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")


class Prefixed(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(f"prefix: {text}")


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


class UserSagaError(SagaError):
    def __init__(self, item: str) -> None:
        self.item = item
        super().__init__(f"Item {item!r} failed.")


# --- helpers ---


def same(left: object, right: object) -> bool:
    """Exact equality: same types all the way down, NaN, -0.0, tz and fold included."""
    if type(left) is not type(right):
        return False
    if isinstance(left, float):
        assert isinstance(right, float)
        if math.isnan(left):
            return math.isnan(right)
        return left == right and math.copysign(1, left) == math.copysign(1, right)
    if isinstance(left, Decimal):
        assert isinstance(right, Decimal)
        return left.compare_total(right) == 0
    if isinstance(left, datetime):
        assert isinstance(right, datetime)
        return (
            left == right
            and left.replace(tzinfo=None) == right.replace(tzinfo=None)
            and left.fold == right.fold
            and left.utcoffset() == right.utcoffset()
            and left.tzname() == right.tzname()
            and type(left.tzinfo) is type(right.tzinfo)
            and getattr(left.tzinfo, "key", None) == getattr(right.tzinfo, "key", None)
        )
    if isinstance(left, list | tuple):
        assert isinstance(right, list | tuple)
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, dict):
        assert isinstance(right, dict)
        return len(left) == len(right) and all(
            same(lk, rk) and same(lv, rv)
            for (lk, lv), (rk, rv) in zip(left.items(), right.items(), strict=True)
        )
    if isinstance(left, enum.Enum):
        return left is right
    if attrs.has(type(left)):
        return all(
            same(getattr(left, f.name), getattr(right, f.name))
            for f in attrs.fields(cast("type[attrs.AttrsInstance]", type(left)))
        )
    return left == right


def short(value: object) -> str:
    """A test id: ints past 4300 digits have no repr."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<huge {type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def through_json(data: Any) -> Any:
    return json.loads(json.dumps(data, allow_nan=False))


def roundtrip(value: object) -> object:
    return decode(through_json(encode(value)))


def refusal(value: object) -> Unencodable:
    with pytest.raises(Unencodable) as info:
        encode(value)
    return info.value


# --- round trips ---

VALUES: list[object] = [
    "text",
    "",
    "$tuple",
    0,
    -17,
    2**64,
    -(2**200),
    10**5000,  # past Python's 4300-digit limit for int <-> str
    -(3**20000),
    1.5,
    0.0,
    -0.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    5e-324,
    True,
    False,
    None,
    [],
    [1, "a", None],
    (),
    (1,),
    (1, (2, [3, (4,)])),
    {},
    {"a": 1, "b": [1.5, {"c": None}]},
    {1: "one", 2: "two"},
    {(1, "a"): "tuple key", None: 0, True: 1, 2.5: "float key"},
    {Color.RED: 1, Level.HIGH: 2, Perm.R | Perm.W: 3},
    {uuid.UUID(int=7): date(2024, 1, 1), date(2020, 2, 29): Decimal("1.10")},
    {"$tuple": [1, 2]},  # plain dicts whose keys look like tags
    {"$dict": [], "$": "$", "$float": "nan"},
    {"plain": 1, "$attrs": f"{MOD}:Point", "x": 1},
    {"a": 1, 5: "b", "c": (3,)},  # mixed keys keep their order
    [{"$datetime": "2024-01-01"}],
    datetime(2024, 5, 1, 12, 30),
    datetime(2024, 5, 1, 12, 30, 15, 123456),
    datetime(2024, 5, 1, 12, 30, tzinfo=UTC),
    datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(2024, 5, 1, tzinfo=timezone(timedelta(hours=-3, seconds=7, microseconds=9))),
    datetime(2024, 5, 1, tzinfo=timezone(timedelta(hours=2), "CEST")),
    datetime(1, 1, 1),
    datetime(9999, 12, 31, 23, 59, 59, 999999),
    datetime(2024, 5, 1, fold=1),  # fold is kept even where it changes nothing
    date(2024, 2, 29),
    date(1, 1, 1),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    Decimal("1.10"),
    Decimal("-0"),
    Decimal("NaN"),
    Decimal("-sNaN12"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    Decimal("1E+999999"),
    Color.RED,
    Color.GREEN,
    Level.LOW,
    Mode.FAST,
    Perm.R,
    Perm.R | Perm.X,
    Perm(0),
    Bits.A | Bits.B,
    Bits(8),  # unnamed bits: stored by value
    Bits(9),  # a named and an unnamed bit
    Outer.Inner.ONE,
    Point(1, 2),
    Loose([1, (2,)], {"k": Point(3)}),
    Pair(Pair(1, (2, 3)), {Color.RED: [Decimal("2")]}),
    HashKey("h"),
    {"points": [Point(1), Point(2)], "when": (date(2024, 1, 1), None)},
]


@pytest.mark.parametrize("value", VALUES, ids=short)
def test_round_trip(value: object) -> None:
    assert same(roundtrip(value), value)


@needs_paris
@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 7, 1, 12, 0, tzinfo=PARIS),
        datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=PARIS),
        datetime(2024, 10, 27, 2, 30, tzinfo=PARIS),  # ambiguous: the first 2:30 (CEST)
        datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS),  # the second 2:30 (CET)
        datetime(2024, 3, 31, 2, 30, tzinfo=PARIS),  # in the spring gap
        {"at": [datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS)]},
    ],
    ids=short,
)
def test_round_trip_zoneinfo(value: object) -> None:
    back = roundtrip(value)
    assert same(back, value)


@needs_paris
def test_zoneinfo_is_kept_as_its_key() -> None:
    value = datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS)
    assert encode(value) == {
        "$datetime": "2024-10-27T02:30:00+01:00",
        "tz": "Europe/Paris",
        "fold": 1,
    }
    back = roundtrip(value)
    assert isinstance(back, datetime)
    assert back.tzinfo is PARIS
    assert (back + timedelta(days=180)).utcoffset() == timedelta(hours=2)  # still a zone


def test_utc_comes_back_as_the_utc_singleton() -> None:
    back = roundtrip(datetime(2024, 1, 1, tzinfo=UTC))
    assert isinstance(back, datetime)
    assert back.tzinfo is UTC


def test_attrs_instances_are_rebuilt_without_init_validators_or_post_init() -> None:
    value = Checked(5, secret="x")
    value.derived = 99  # an init=False field: stored like the others
    CALLS.clear()
    back = roundtrip(value)
    assert not CALLS
    assert isinstance(back, Checked)
    assert (back.value, back.derived, back._secret, back.converted) == (5, 99, "x", 8)


def test_frozen_cache_hash_instances_hash_after_decoding() -> None:
    back = roundtrip({HashKey("a"): 1})
    assert back == {HashKey("a"): 1}


def test_decoded_containers_are_fresh() -> None:
    value = {"a": [1, 2]}
    data = encode(value)
    first, second = decode(data), decode(data)
    assert first == second == value
    assert first is not second
    assert isinstance(first, dict)
    assert isinstance(second, dict)
    assert first["a"] is not second["a"]


def test_tagged_format_is_readable() -> None:
    assert encode({"a": [1, "x", None, True, 2.5]}) == {"a": [1, "x", None, True, 2.5]}
    assert encode((1, 2)) == {"$tuple": [1, 2]}
    assert encode(float("nan")) == {"$float": "nan"}
    assert encode(-0.0) == {"$float": "-0.0"}
    assert encode({1: "a"}) == {"$dict": [[1, "a"]]}
    assert encode({"$x": 1}) == {"$dict": [["$x", 1]]}
    assert encode(date(2024, 1, 2)) == {"$date": "2024-01-02"}
    assert encode(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == {
        "$datetime": "2024-01-02T03:04:05+00:00"
    }
    assert encode(Decimal("1.10")) == {"$decimal": "1.10"}
    assert encode(uuid.UUID(int=1)) == {"$uuid": "00000000-0000-0000-0000-000000000001"}
    assert encode(Color.RED) == {"$enum": f"{MOD}:Color", "name": "RED"}
    assert encode(Perm.R | Perm.W) == {"$enum": f"{MOD}:Perm", "name": "R|W"}
    assert encode(Point(1, 2)) == {"$attrs": f"{MOD}:Point", "x": 1, "y": 2}
    assert encode(Outer.Inner.ONE) == {"$enum": f"{MOD}:Outer.Inner", "name": "ONE"}
    assert encode(2**5000) == {"$int": hex(2**5000)}


def test_tag_keys_in_any_order_decode() -> None:
    # Stores such as PostgreSQL's jsonb reorder object keys.
    assert decode({"y": 2, "x": 1, "$attrs": f"{MOD}:Point"}) == Point(1, 2)
    assert decode({"tz": "UTC", "$datetime": "2024-01-01T00:00:00+00:00"}) == datetime(
        2024, 1, 1, tzinfo=UTC
    )


def test_attrs_field_added_since_takes_its_default() -> None:
    assert decode({"$attrs": f"{MOD}:Point", "x": 1}) == Point(1, 0)


# --- a property over nested values ---

if HAS_PARIS:
    _ZONES = st.sampled_from([None, UTC, timezone(timedelta(hours=-7)), PARIS])
else:
    _ZONES = st.sampled_from([None, UTC, timezone(timedelta(hours=-7))])
SCALARS = (
    st.text(max_size=8)
    | st.sampled_from(["$tuple", "$dict", "$", "$attrs", "$float"])
    | st.integers()
    | st.integers(0, 20000).map(lambda n: (1 << n) - 3)
    | st.floats()
    | st.booleans()
    | st.none()
    | st.builds(
        lambda moment, fold: moment.replace(fold=fold),
        st.datetimes(timezones=_ZONES),
        st.sampled_from([0, 1]),
    )
    | st.dates()
    | st.uuids()
    | st.decimals()
    | st.sampled_from([Color.RED, Level.HIGH, Mode.FAST, Perm.R | Perm.W, Perm(0), Bits(8)])
    | st.builds(Point, st.integers(), st.integers())
)
KEYS = (
    st.text(max_size=5)
    | st.sampled_from(["$tuple", "$dict", "$"])
    | st.integers()
    | st.tuples(st.integers(), st.text(max_size=3))
    | st.sampled_from([Color.RED, Level.LOW, None, True])
)
NESTED = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(KEYS, children, max_size=4)
        | st.dictionaries(st.text(max_size=5), children, max_size=4)
        | st.builds(Pair, children, children)
        | st.builds(Loose, children)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, database=None)
@given(NESTED)
def test_round_trip_property(value: object) -> None:
    data = encode(value)
    assert same(decode(through_json(data)), value)
    assert same(encode(decode(data)), data)


# --- refusals ---


class MyStr(str):
    __slots__ = ()


class MyInt(int):
    pass


class MyList(list[int]):
    pass


class MyDict(dict[str, int]):
    pass


Pt = namedtuple("Pt", "x y")


@pytest.mark.parametrize(
    ("value", "type_name", "base"),
    [
        (MyStr("s"), f"{MOD}.MyStr", "str"),
        (MyInt(1), f"{MOD}.MyInt", "int"),
        (MyList(), f"{MOD}.MyList", "list"),
        (MyDict(), f"{MOD}.MyDict", "dict"),
        (OrderedDict(), "collections.OrderedDict", "dict"),
        (defaultdict(list), "collections.defaultdict", "dict"),
        (Pt(1, 2), f"{MOD}.Pt", "tuple"),
    ],
)
def test_subclasses_of_supported_types_are_refused(
    value: object, type_name: str, base: str
) -> None:
    error = refusal(value)
    assert (error.path, error.type_name) == ("", type_name)
    assert f"subclass of {base}" in error.reason
    assert "only exact types" in error.reason


@pytest.mark.parametrize(
    ("value", "type_name", "reason"),
    [
        ({1, 2}, "builtins.set", "sets are not stored"),
        (frozenset(), "builtins.frozenset", "sets are not stored"),
        (b"x", "builtins.bytes", "bytes are not stored"),
        (bytearray(), "builtins.bytearray", "bytes are not stored"),
        (object(), "builtins.object", "not a type the journal stores"),
        (timedelta(1), "datetime.timedelta", "not a type the journal stores"),
        (collections.deque(), "collections.deque", "not a type the journal stores"),
        (Level, "enum.EnumType", "not a type the journal stores"),  # a class, not a member
    ],
)
def test_unsupported_types_are_refused(value: object, type_name: str, reason: str) -> None:
    error = refusal(value)
    assert (error.path, error.type_name) == ("", type_name)
    assert reason in error.reason
    assert type_name in str(error)


def test_the_path_names_where_the_value_is() -> None:
    error = refusal({"items": [1, 2, {3}]})
    assert (error.path, error.type_name) == ("['items'][2]", "builtins.set")
    error = refusal([Pair(1, (0, Loose(b"x")))])
    assert (error.path, error.type_name) == ("[0].right[1].a", "builtins.bytes")
    error = refusal({1: "ok", 2: [object()]})
    assert error.path == "[2][0]"
    error = refusal({"ok": 1, frozenset(): 2})
    assert error.path == "[frozenset()]"
    assert error.reason.startswith("the dict key frozenset()")


def test_local_classes_are_refused() -> None:
    @attrs.define
    class LocalPoint:
        x: int

    class LocalEnum(enum.Enum):
        A = 1

    for value in (LocalPoint(1), LocalEnum.A):
        error = refusal({"v": value})
        assert error.path == "['v']"
        assert error.type_name == f"{MOD}.{type(value).__qualname__}"
        assert "<locals>" in error.type_name
        assert "inside a function" in error.reason


def test_a_class_not_found_under_its_name_is_refused() -> None:
    shadowed = attrs.make_class("Shadowed", ["x"])
    shadowed.__module__ = MOD
    error = refusal(shadowed(1))
    assert error.type_name == f"{MOD}.Shadowed"
    assert f"{MOD}:Shadowed" in error.reason


def test_a_class_replaced_under_its_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    old = Point(1)
    assert encode(old) == {"$attrs": f"{MOD}:Point", "x": 1, "y": 0}  # now cached
    monkeypatch.setattr(sys.modules[MOD], "Point", attrs.make_class("Point", ["x", "y"]))
    error = refusal(old)  # the stored name would find the new class
    assert error.type_name == f"{MOD}.Point"
    assert "not the one found under its name" in error.reason


def test_unsupported_tzinfo_and_unset_fields_are_refused() -> None:
    class Odd(tzinfo):
        def utcoffset(self, dt: datetime | None) -> timedelta:
            return timedelta(0)

        def dst(self, dt: datetime | None) -> timedelta:
            return timedelta(0)

        def tzname(self, dt: datetime | None) -> str:
            return "odd"

    error = refusal([datetime(2024, 1, 1, tzinfo=Odd())])
    assert (error.path, error.type_name) == ("[0]", "datetime.datetime")
    assert "tzinfo" in error.reason
    unset = object.__new__(Point)
    error = refusal(unset)
    assert (error.path, error.type_name) == (".x", f"{MOD}.Point")
    assert "not set" in error.reason


def test_cycles_are_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    error = refusal(loop)
    assert "contains itself" in error.reason


# --- decoding never imports ---


@pytest.mark.parametrize("module", ["wave", "this"])
def test_decoding_never_imports(module: str) -> None:
    if module in sys.modules:
        pytest.skip(f"{module} is already imported")
    before = set(sys.modules)
    for data in (
        {"$enum": f"{module}:Error", "name": "X"},
        {"$attrs": f"{module}:Wave_read"},
    ):
        with pytest.raises(Undecodable, match=f"module {module} is not imported"):
            decode(data)
    error = decode_error({"module": module, "type": "Error", "message": "m", "args": ["m"]})
    assert isinstance(error, RecordedError)
    assert module not in sys.modules
    assert set(sys.modules) == before


def test_decoding_does_not_call_module_getattr(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    lazy = types.ModuleType("lazy_codec_module")
    lazy.__getattr__ = calls.append  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "lazy_codec_module", lazy)
    with pytest.raises(Undecodable, match="has no Thing"):
        decode({"$attrs": "lazy_codec_module:Thing"})
    assert calls == []


@pytest.mark.parametrize(
    "data",
    [
        {"$nope": 1},
        {"$tuple": "abc"},
        {"$tuple": [1], "x": 2},
        {"$tuple": [1], "$dict": []},
        {"$float": "1.5"},
        {"$float": 1.5},
        {"$int": 5},
        {"$int": "zz"},
        {"$dict": [[1]]},
        {"$dict": {"a": 1}},
        {"$dict": [[[1], 2]]},  # an unhashable key
        {"$datetime": "garbage"},
        {"$datetime": 5},
        {"$datetime": "2024-01-01T00:00:00", "zone": "UTC"},
        {"$datetime": "2024-01-01T00:00:00", "tz": "Not/AZone"},
        {"$datetime": "2024-01-01T00:00:00", "tz": "../../etc/passwd"},
        {"$datetime": "2024-01-01T00:00:00", "fold": 2},
        {"$date": "2024-13-01"},
        {"$uuid": "nope"},
        {"$decimal": 1.5},
        {"$decimal": "x"},
        {"$enum": "nocolon", "name": "X"},
        {"$enum": 5, "name": "X"},
        {"$enum": f"{MOD}:Color", "name": "PURPLE"},
        {"$enum": f"{MOD}:Color", "name": 1},
        {"$enum": f"{MOD}:Color"},
        {"$enum": f"{MOD}:Color", "value": 1},  # by value: flags only
        {"$enum": f"{MOD}:Perm", "name": "R|Q"},
        {"$enum": f"{MOD}:Point", "name": "X"},
        {"$enum": f"{MOD}:Missing", "name": "X"},
        {"$attrs": f"{MOD}:Color"},
        {"$attrs": f"{MOD}:Point", "x": 1, "zz": 2},
        {"$attrs": f"{MOD}:Point", "y": 1},
        {"$attrs": f"{MOD}:Outer.Inner"},
        {"$attrs": f"{MOD}:Outer.Nope.Deeper"},
        [1, {2, 3}],
        b"bytes",
    ],
    ids=short,
)
def test_malformed_data_is_undecodable(data: Any) -> None:
    with pytest.raises(Undecodable):
        decode(data)


# --- saga fields ---


def test_encode_fields_stores_every_field_by_name() -> None:
    saga = Order(order_id="o-1", amount=3, lines=[Point(1)])
    assert encode_fields(saga) == {
        "order_id": "o-1",
        "amount": 3,
        "lines": [{"$attrs": f"{MOD}:Point", "x": 1, "y": 0}],
        "note": "order o-1",
        "status": {"$enum": f"{MOD}:Status", "name": "NEW"},
        "placed": None,
    }


def test_encode_fields_path_starts_with_the_field() -> None:
    saga = Order(order_id="o-1")
    saga.lines = [Point(1), Point({1})]  # type: ignore[arg-type]
    with pytest.raises(Unencodable) as info:
        encode_fields(saga)
    assert (info.value.path, info.value.type_name) == ("lines[1].x", "builtins.set")
    saga.lines = []
    saga.placed = b"x"  # type: ignore[assignment]
    with pytest.raises(Unencodable) as info:
        encode_fields(saga)
    assert info.value.path == "placed"


def test_apply_fields_sets_the_stored_fields() -> None:
    saga = Order(order_id="o-1", amount=3)
    stored = through_json(encode_fields(Order(order_id="o-2", amount=5, lines=[Point(2)])))
    del stored["note"]
    CALLS.clear()
    apply_fields(saga, stored)
    assert not CALLS
    assert (saga.order_id, saga.amount, saga.lines) == ("o-2", 5, [Point(2)])
    assert saga.note == "order o-1"  # not stored: unchanged


def test_apply_fields_refuses_unknown_fields_and_changes_nothing() -> None:
    saga = Order(order_id="o-1", amount=3)
    with pytest.raises(Undecodable, match="'gone'"):
        apply_fields(saga, {"amount": 4, "gone": 1})
    with pytest.raises(Undecodable, match="'status'"):
        apply_fields(saga, {"amount": 4, "status": {"$enum": f"{MOD}:Status", "name": "X"}})
    assert saga.amount == 3


def test_instance_from_fields_builds_without_init() -> None:
    saga = Order(order_id="o-1", amount=3, lines=[Point(1, 2)], placed=datetime(2024, 1, 1))
    saga.status = Status.PAID
    stored = through_json(encode_fields(saga))
    CALLS.clear()
    back = instance_from_fields(Order, stored)
    assert not CALLS
    assert type(back) is Order
    assert encode_fields(back) == stored
    assert back.sequence() == ("place",)


def test_instance_from_fields_defaults_missing_fields() -> None:
    CALLS.clear()
    first = instance_from_fields(Order, {"order_id": "o-9"})
    second = instance_from_fields(Order, {"order_id": "o-9"})
    assert not CALLS
    assert (first.amount, first.lines, first.note, first.status) == (0, [], "order o-9", Status.NEW)
    assert first.lines is not second.lines  # a factory runs per instance
    checked = instance_from_fields(Checked, {"value": 1})
    assert (checked.converted, checked.derived) == (8, 0)  # defaults go through converters


def test_a_failing_default_is_undecodable() -> None:
    with pytest.raises(Undecodable, match="default of field 'items'"):
        instance_from_fields(Fragile, {})
    with pytest.raises(Undecodable, match="ZeroDivisionError"):
        decode({"$attrs": f"{MOD}:Fragile"})


def test_instance_from_fields_refuses_unknown_and_required_fields() -> None:
    with pytest.raises(Undecodable, match="'legacy'"):
        instance_from_fields(Order, {"order_id": "o", "legacy": 1})
    with pytest.raises(Undecodable, match="'order_id'"):
        instance_from_fields(Order, {"amount": 1})


# --- recorded errors ---


def record(error: BaseException) -> Any:
    data = encode_error(error)
    json.dumps(data, allow_nan=False)
    return through_json(data)


def rebuilt(error: BaseException) -> BaseException:
    return decode_error(record(error))


@pytest.mark.parametrize(
    "error",
    [
        ValueError("x"),
        KeyError("k"),
        KeyError(("a", 1)),
        OSError(2, "no"),
        FileNotFoundError(2, "no", "f.txt"),
        TimeoutError(),
        RuntimeError(),
        ValueError(float("nan"), Color.RED, (1, 2)),
        Fine("fine", 3),
    ],
    ids=short,
)
def test_errors_rebuilt_as_their_class(error: BaseException) -> None:
    back = rebuilt(error)
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert same(back.args, error.args)


def test_oserror_fields_come_back(tmp_path: Any) -> None:
    back = rebuilt(OSError(2, "no"))
    assert isinstance(back, FileNotFoundError)
    assert (back.errno, back.strerror, back.filename) == (2, "no", None)
    with pytest.raises(FileNotFoundError) as info:
        (tmp_path / "missing").open()
    back = rebuilt(info.value)
    assert type(back) is FileNotFoundError
    assert str(back) == str(info.value)
    assert back.args == info.value.args
    assert back.filename == str(tmp_path / "missing")
    back = rebuilt(OSError(1, "both", "a", None, "b"))
    assert isinstance(back, PermissionError)
    assert (back.filename, back.filename2) == ("a", "b")


def test_record_format() -> None:
    assert encode_error(KeyError("k")) == {
        "module": "builtins",
        "type": "KeyError",
        "message": "'k'",
        "args": ["k"],
    }


@pytest.mark.parametrize(
    ("error", "type_name", "message"),
    [
        (Custom(1, "x"), f"{MOD}.Custom", "1: x"),
        (Prefixed("a"), f"{MOD}.Prefixed", "prefix: a"),  # cls(*args) says something else
        (ValueError(object()), "builtins.ValueError", None),  # args that do not encode
        (asyncio.CancelledError("stop"), "asyncio.exceptions.CancelledError", "stop"),
        (KeyboardInterrupt(), "builtins.KeyboardInterrupt", ""),
        (SystemExit(3), "builtins.SystemExit", "3"),
        (AggregateNotFound("Order", object()), "declsaga._errors.AggregateNotFound", None),
    ],
    ids=short,
)
def test_errors_recorded_as_recorded_error(
    error: BaseException, type_name: str, message: str | None
) -> None:
    back = rebuilt(error)
    assert type(back) is RecordedError
    assert back.type_name == type_name
    assert back.message == (str(error) if message is None else message)
    assert str(back) == f"{type_name}: {back.message}"


def test_local_and_non_exception_classes_are_recorded_errors() -> None:
    class Local(Exception):
        pass

    back = rebuilt(Local("l"))
    assert isinstance(back, RecordedError)
    assert (
        back.type_name
        == f"{MOD}.test_local_and_non_exception_classes_are_recorded_errors.<locals>.Local"
    )
    fake = {"module": "json", "type": "JSONDecoder", "message": "m", "args": ["m"]}
    assert isinstance(decode_error(fake), RecordedError)


def test_recording_never_fails() -> None:
    data = record(Unprintable("x"))
    assert data["message"] == "<unprintable Unprintable>"
    loop = SagaError("loop")
    loop.me = loop  # type: ignore[attr-defined]
    back = decode_error(record(loop))  # recorded to a fixed depth, then dropped
    assert isinstance(back, SagaError)
    assert str(back) == "loop"


@pytest.mark.parametrize(
    "error",
    [
        ActionNotFound("fix", role="the compensator of 'x'"),
        CompensationTimeout("pay", "refund", 1.5),
        EncodeError("field items[2]", "pay", "builtins.set", "sets are not stored"),
        EmptyActionName(" ", position=2),
        MissingBus("event", "pay"),
        RecordedError("x.Y", "m"),
        UserSagaError("i"),
        AggregateNotFound("Order", uuid.UUID(int=3)),
    ],
    ids=short,
)
def test_declsaga_errors_rebuilt_with_fields(error: SagaError) -> None:
    back = rebuilt(error)
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert back.args == error.args
    assert vars(back) == vars(error)


def test_compensation_failed_keeps_both_errors() -> None:
    error = CompensationFailed(ValueError("declined"), CompensationTimeout("pay", "refund", 2.0))
    back = rebuilt(error)
    assert isinstance(back, CompensationFailed)
    assert str(back) == str(error)
    assert type(back.action_error) is ValueError
    assert str(back.action_error) == "declined"
    assert type(back.error) is CompensationTimeout
    assert vars(back.error) == vars(error.error)
    assert back.__cause__ is back.error


def test_compensation_failed_with_inner_errors_that_cannot_be_rebuilt() -> None:
    error = CompensationFailed(asyncio.CancelledError(), Custom(1, "x"))
    back = rebuilt(error)
    assert isinstance(back, CompensationFailed)
    assert str(back) == str(error)
    assert isinstance(back.action_error, RecordedError)
    assert isinstance(back.error, RecordedError)
    assert back.error.type_name == f"{MOD}.Custom"
    assert back.__cause__ is back.error


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"module": "builtins", "type": "ValueError", "message": "x"},
        {"module": "builtins", "type": "ValueError", "message": 1, "args": []},
        {"module": 1, "type": "ValueError", "message": "x", "args": []},
        {"module": "builtins", "type": "ValueError", "message": "x", "args": "x"},
        {
            "module": "declsaga._errors",
            "type": "CompensationFailed",
            "message": "x",
            "args": ["x"],
            "errors": {"error": "not a record"},
        },
    ],
    ids=short,
)
def test_malformed_error_records_are_undecodable(data: Any) -> None:
    with pytest.raises(Undecodable):
        decode_error(data)
