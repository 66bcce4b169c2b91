"""Known values change while the gateway serves: `KnownIndex` (plugins/masking/known.py, forms.py).

The promises: a value added is masked from the moment its change is applied (no rebuild awaited); a removed
value stays masked until the index is rebuilt (never less masking); the large rebuild runs off the event
loop's thread and a burst of changes costs one rebuild; a re-list with the same values rebuilds nothing; and
masking across the index's parts is as tight as with one automaton (overlapping values, streams).
"""

from __future__ import annotations

import asyncio
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from kubegate.plugins.masking import Masking, MaskingSettings
from kubegate.plugins.masking import known as known_module
from kubegate.plugins.masking.forms import FormSet, KnownForms, merged
from kubegate.plugins.masking.known import forms_of
from kubegate.plugins.masking.stream import StreamMasker
from kubegate.plugins.masking.text import TextMasker

MARKER = "<masked by kubegate>"
BASE = {f"base-secret-{i:04d}-value" for i in range(50)}


def masking_with(values: set[str]) -> Masking:
    m = Masking(MaskingSettings())
    m.set_known(values)
    return m


async def settled(m: Masking) -> None:
    task = m.known_index._rebuild
    if task is not None:
        await task


async def test_an_added_value_is_masked_at_once_without_a_rebuild():
    m = masking_with(BASE)
    m.known_changed(BASE | {"fresh-secret-value-1"})
    # no await in between: the delta part already holds it
    assert m.text.mask("log: fresh-secret-value-1 base-secret-0007-value") == f"log: {MARKER} {MARKER}"
    assert m.known_index.rebuilds == 0 and m.known_index._rebuild is None
    assert len(m.text.known.parts) == 2  # type: ignore[union-attr]


async def test_a_removed_value_stays_masked_until_the_rebuild_then_not():
    m = masking_with(BASE)
    m.known_changed(BASE - {"base-secret-0003-value"})
    assert m.text.mask("base-secret-0003-value") == MARKER  # more masking for a moment, never less
    await settled(m)
    assert m.known_index.rebuilds == 1
    assert m.text.mask("base-secret-0003-value") == "base-secret-0003-value"
    assert m.text.mask("base-secret-0004-value") == MARKER


async def test_the_rebuild_runs_in_a_worker_thread(monkeypatch):
    threads: list[int] = []
    real_build = known_module._build_all

    def recording_build(values):
        threads.append(threading.get_ident())
        return real_build(values)

    monkeypatch.setattr(known_module, "_build_all", recording_build)
    m = masking_with(BASE)
    m.known_changed(BASE - {"base-secret-0001-value"})
    await settled(m)
    assert threads and threading.get_ident() not in threads


async def test_a_burst_of_changes_costs_at_most_two_rebuilds_and_ends_exact():
    m = masking_with(BASE)
    wanted = set(BASE)
    for i in range(40):  # removals and additions, without yielding to the rebuild in between
        wanted.discard(f"base-secret-{i:04d}-value")
        wanted.add(f"later-secret-{i:04d}-value")
        m.known_changed(set(wanted))
        assert m.text.mask(f"later-secret-{i:04d}-value") == MARKER
    await settled(m)
    assert m.known_index.rebuilds <= 2
    await settled(m)
    assert m.text.mask("base-secret-0000-value later-secret-0039-value base-secret-0049-value") == (
        f"base-secret-0000-value {MARKER} {MARKER}"
    )
    assert m.known_index.base_values == frozenset(wanted) and not m.known_index.delta_values


async def test_a_growing_delta_is_folded_into_the_base(monkeypatch):
    monkeypatch.setattr(known_module, "DELTA_FORMS", 3)
    m = masking_with(BASE)
    m.known_changed(BASE | {f"added-secret-{i}-xyz" for i in range(5)})  # 5 values: 10 forms
    await settled(m)
    assert m.known_index.rebuilds == 1 and not m.known_index.delta_values
    assert m.text.mask("added-secret-4-xyz") == MARKER


async def test_a_relist_with_the_same_values_rebuilds_nothing():
    m = masking_with(BASE)
    before = m.text
    m.known_changed(set(BASE))
    assert m.text is before and m.known_index._rebuild is None


async def test_the_first_listing_is_indexed_at_once():
    m = Masking(MaskingSettings())
    m.known_changed(BASE)
    assert m.text.mask("base-secret-0042-value") == MARKER and m.known_index._rebuild is None


def test_values_that_run_into_each_other_are_masked_whole():
    # Leftmost-longest matching alone masked the first and let the rest of the second out.
    masker = TextMasker(MARKER, known=["secret-one-abc", "abc-two-secret"])
    assert masker.mask("x secret-one-abc-two-secret y") == f"x {MARKER} y"
    assert masker.mask("x abc-two-secret-one-abc y") == f"x {MARKER} y"
    stream = StreamMasker(masker)
    out = (
        stream.feed(b"x secret-one-ab") + stream.feed(b"c-two-sec") + stream.feed(b"ret y\n") + stream.flush()
    )
    assert out == f"x {MARKER} y\n".encode()


def test_values_that_overlap_across_parts_are_masked_whole():
    # One value in the base, one in the delta, overlapping in the text: neither's characters go out.
    two_parts = KnownForms([FormSet.build(forms_of({"abcd1234"})), FormSet.build(forms_of({"1234efgh"}))])
    masker = TextMasker(MARKER, known_forms=two_parts)
    assert masker.mask("x abcd1234efgh y") == f"x {MARKER} y"
    assert masker.mask("x 1234efgh abcd1234 y") == f"x {MARKER} {MARKER} y"


def test_a_stream_holds_a_value_of_the_delta_across_frames():
    m = masking_with(BASE)

    async def change() -> None:
        m.known_changed(BASE | {"delta-only-secret-99"})

    asyncio.run(change())
    stream = StreamMasker(m.text)
    out = stream.feed(b"before delta-only-sec") + stream.feed(b"ret-99 after\n") + stream.flush()
    assert out == f"before {MARKER} after\n".encode()


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.text(alphabet="ab", min_size=4, max_size=7), min_size=1, max_size=6, unique=True),
    split=st.integers(min_value=0, max_value=6),
    filler=st.lists(st.sampled_from(["a", "b", " "]), max_size=12),
)
def test_parts_mask_what_one_automaton_masks(values, split, filler):
    """The values split in two parts mask the same characters as one automaton over all of them."""
    text = "".join(filler[: len(filler) // 2]) + "".join(values) + "".join(filler[len(filler) // 2 :])
    one = KnownForms([FormSet.build(forms_of(values))])
    two = KnownForms([FormSet.build(forms_of(values[:split])), FormSet.build(forms_of(values[split:]))])

    def covered(known: KnownForms) -> set[int]:
        return {i for start, end in known.spans(text) for i in range(start, end)}

    assert covered(one) == covered(two)
    # and every occurrence of every value is inside one masked span, with one automaton or two
    for spans in (one.spans(text), two.spans(text)):
        for value in values:
            at = text.find(value)
            while at >= 0:
                assert any(start <= at and at + len(value) <= end for start, end in spans), (value, text)
                at = text.find(value, at + 1)


# -- Hyperscan literal databases (forms.py LiteralScan) ------------------------------------------------------


def with_literals(parts: list[FormSet]) -> KnownForms:
    known = KnownForms([part.with_literals() for part in parts])
    assert known.literal
    return known


@settings(max_examples=300, deadline=None)
@given(
    forms=st.lists(st.text(alphabet="ab1", min_size=1, max_size=6), min_size=1, max_size=8, unique=True),
    split=st.integers(min_value=0, max_value=8),
    text=st.text(alphabet="ab1 ", max_size=40),
)
def test_literal_databases_give_the_automatons_spans(forms, split, text):
    """Every occurrence of every form, overlapping ones merged: the same spans from Hyperscan as from the
    automata (leftmost-longest plus the runs on), in one part or two."""
    occurrences = [
        (at, at + len(form)) for form in forms for at in range(len(text)) if text.startswith(form, at)
    ]
    expected = merged(occurrences)  # every occurrence, found by brute force; overlapping ones merged
    for parts in ([forms], [forms[:split], forms[split:]]):
        automata = KnownForms([FormSet.build(part) for part in parts])
        literal = with_literals([FormSet.build(part) for part in parts])
        assert automata.spans(text) == expected, (parts, text)
        assert literal.spans(text) == expected, (parts, text)


def test_a_form_inside_the_beginning_of_a_longer_one_is_found():
    """pyahocorasick's leftmost-longest scan, used before, missed these (a known value in clear)."""
    for known in (
        KnownForms([FormSet.build({"b", "ab1", "1ab1"})]),
        with_literals([FormSet.build({"b", "ab1", "1ab1"})]),
    ):
        assert known.spans("1ab") == [(2, 3)]
    masker = TextMasker(MARKER, known=["db-password-1", "mydb-password-12"])
    assert masker.mask("user=mydb-password-1") == f"user=my{MARKER}"
    stream = StreamMasker(masker)
    assert stream.feed(b"echo: mydb-password-1") + stream.flush() == f"echo: my{MARKER}".encode()


def test_text_that_is_not_ascii_and_forms_with_a_nul_byte_are_searched_by_the_automata():
    known = with_literals([FormSet.build({"hunter2", "héllo-secret"})])
    # Not ASCII: character offsets are not byte offsets, so the automata search (and find the non-ASCII form).
    assert known.spans("é hunter2 héllo-secret") == [(2, 9), (10, 22)]
    assert known.spans("x hunter2 y") == [(2, 9)]
    # Hyperscan's literal compiler would end "ab\0cd" at the NUL (and find every "ab"): no database.
    nul = FormSet.build({"ab\0cd", "hunter2"}).with_literals()
    assert nul.literals is None and not KnownForms([nul]).literal
    assert KnownForms([nul]).spans("ab ab\0cd hunter2") == [(3, 8), (9, 16)]


async def test_the_index_publishes_literal_databases_once_compiled_off_the_loop():
    published: list[KnownForms] = []
    index = known_module.KnownIndex(published.append)
    index.update(BASE)  # the first listing: automata at once, the database compiled in a worker thread
    assert published and not published[-1].literal
    await index._compile
    assert published[-1].literal and index.base.literals is not None
    index.update(BASE | {"added-later-secret"})  # a delta: automata at once, then its database
    assert not published[-1].literal
    assert published[-1].spans("x added-later-secret y") == [(2, 20)]
    await index._compile
    assert published[-1].literal
    assert published[-1].spans("x added-later-secret base-secret-0001-value y") == [(2, 20), (21, 43)]
    await index.close()


async def test_a_connections_gauges_say_how_its_known_values_are_searched():
    from kubegate.core.observe import REGISTRY

    def sample(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"connection": "gauged"})

    m = Masking(MaskingSettings(), "gauged")
    assert sample("kubegate_masking_known_forms") == 0 and sample("kubegate_masking_known_literal") == 1
    m.known_changed(BASE)  # the first listing, on the event loop: the automaton searches at once
    assert sample("kubegate_masking_known_forms") == len(forms_of(BASE))
    assert sample("kubegate_masking_known_literal") == 0
    await m.known_index._compile
    assert sample("kubegate_masking_known_literal") == 1
    await m.known_index.close()
