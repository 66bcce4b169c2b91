"""`HookSnapshot` calls a hook's implementations the way pluggy does (the request path's hooks go through it,
issue 15): compared with pluggy's own call on the same manager, for any mix of plugins."""

from __future__ import annotations

import pluggy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubegate.core.plugins import CountingPluginManager, HookSnapshot

PROJECT = "snapshot-test"
spec = pluggy.HookspecMarker(PROJECT)
impl = pluggy.HookimplMarker(PROJECT)


class Specs:
    @spec
    def collect(self, flow, extra):
        """Every answer."""

    @spec(firstresult=True)
    def first(self, flow, extra):
        """The first answer."""


def plugin(number: int, answer: object, order: str, takes_extra: bool):
    """A plugin answering `answer` (None: no answer) from both hooks, tryfirst/trylast/plain."""
    options = {"tryfirst": order == "first", "trylast": order == "last"}

    if takes_extra:

        class WithExtra:
            @impl(**options)
            def collect(self, flow, extra):
                return answer if answer is None else (number, answer, flow, extra)

            @impl(**options)
            def first(self, flow, extra):
                return answer if answer is None else (number, answer, flow, extra)

        return WithExtra()

    class FlowOnly:  # an implementation may take fewer arguments than the spec
        @impl(**options)
        def collect(self, flow):
            return answer if answer is None else (number, answer, flow)

        @impl(**options)
        def first(self, flow):
            return answer if answer is None else (number, answer, flow)

    return FlowOnly()


def manager() -> CountingPluginManager:
    pm = CountingPluginManager(PROJECT)
    pm.add_hookspecs(Specs)
    return pm


plugins_strategy = st.lists(
    st.tuples(
        st.sampled_from([None, "a", 0, ""]), st.sampled_from(["first", "plain", "last"]), st.booleans()
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(plugins_strategy, st.sets(st.integers(0, 7)))
def test_answers_and_their_order_are_pluggys(specs, removed):
    pm = manager()
    registered = [
        pm.register(plugin(i, *s), name=f"p{i}") and pm.get_plugin(f"p{i}") for i, s in enumerate(specs)
    ]
    remove = [p for i, p in enumerate(registered) if i in removed]
    for name in ("collect", "first"):
        pluggys = pm.subset_hook_caller(name, remove)
        snapshot = HookSnapshot(pm, pm.subset_hook_caller(name, remove))
        assert snapshot(flow="f", extra="x") == pluggys(flow="f", extra="x")
        whole = getattr(pm.hook, name)
        assert HookSnapshot(pm, whole)(flow="f", extra="x") == whole(flow="f", extra="x")


def test_a_plugin_registered_or_removed_after_the_first_call_is_seen():
    pm = manager()
    pm.register(plugin(1, "a", "plain", True), name="one")
    snapshot = HookSnapshot(pm, pm.hook.collect)
    assert [answer[0] for answer in snapshot(flow="f", extra="x")] == [1]
    pm.register(plugin(2, "b", "plain", True), name="two")
    assert [answer[0] for answer in snapshot(flow="f", extra="x")] == [2, 1]
    pm.unregister(name="one")
    assert [answer[0] for answer in snapshot(flow="f", extra="x")] == [2]
    pm.set_blocked("two")
    assert snapshot(flow="f", extra="x") == []


def test_an_implementations_exception_is_raised_as_is_and_later_ones_are_not_called():
    called = []

    class Boom:
        @impl
        def collect(self, flow, extra):
            raise KeyError("boom")

    class Earlier:  # registered first: pluggy calls it last
        @impl
        def collect(self, flow, extra):
            called.append("earlier")

    pm = manager()
    pm.register(Earlier(), name="earlier")
    pm.register(Boom(), name="boom")
    with pytest.raises(KeyError, match="boom"):
        HookSnapshot(pm, pm.hook.collect)(flow="f", extra="x")
    assert called == []


@pytest.mark.parametrize("style", ["hookwrapper", "wrapper"])
def test_a_hook_with_a_wrapper_is_called_through_pluggy(style):
    seen = []

    class Wrapping:
        if style == "hookwrapper":

            @impl(hookwrapper=True)
            def collect(self, flow, extra):
                seen.append("before")
                yield
                seen.append("after")
        else:

            @impl(wrapper=True)
            def collect(self, flow, extra):
                seen.append("before")
                result = yield
                seen.append("after")
                return result

    pm = manager()
    pm.register(plugin(1, "a", "plain", True), name="one")
    pm.register(Wrapping(), name="wrapping")
    assert [answer[0] for answer in HookSnapshot(pm, pm.hook.collect)(flow="f", extra="x")] == [1]
    assert seen == ["before", "after"]


def test_a_manager_that_does_not_count_its_changes_is_always_asked():
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(Specs)
    snapshot = HookSnapshot(pm, pm.hook.collect)
    assert snapshot(flow="f", extra="x") == []
    pm.register(plugin(1, "a", "plain", True), name="one")  # no generation to tell: pluggy's call sees it
    assert [answer[0] for answer in snapshot(flow="f", extra="x")] == [1]
