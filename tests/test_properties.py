"""Properties: arbitrary arguments only ever raise ScoriaError and write nothing when rejected;
handoff contexts are refused exactly when an unsafe key hides in them."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
from _helpers import (
    IDENTITY,
    UNSAFE_NAMES,
    UNSAFE_PREFIXES,
    UNSAFE_SUFFIXES,
    row_counts,
    wait_for_approval,
)
from flask import Flask
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import flask_scoria as scoria

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Stands for the id of a real run, paused for approval, made for each example.
REAL_RUN = "<real run>"

texts = st.text(alphabet=st.characters(codec=None), max_size=40)
junk_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    texts,
    st.binary(max_size=8),
    st.uuids(),
    st.uuids().map(str),
    st.sampled_from(
        ["", " ", "\x00", "x" * 300, "y" * 20_000, "executor", "work", "\ud800", REAL_RUN]
    ),
    st.builds(object),
)
junk = st.recursive(
    junk_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children, children),
        st.dictionaries(st.one_of(texts, st.integers(), st.none()), children, max_size=3),
        st.dictionaries(
            st.sampled_from(
                ["actor_id", "tenant_id", "session_id", "metadata", "kind", "sequence", "work"]
            ),
            children,
            max_size=3,
        ),
    ),
    max_leaves=8,
)


def paused_run_id() -> str:
    return scoria.start_run(
        scoria.identity(IDENTITY),
        initial_step={"kind": "work"},
        handlers={"work": wait_for_approval},
    ).run_id


def real(value: Any, run_id: str) -> Any:
    return run_id if value == REAL_RUN else value


VERBS: dict[str, Callable[..., Any]] = {
    "start_run": lambda run_id, a, b, c, d: scoria.start_run(
        a, root_role_id=b, initial_step=c, runtime=d, handlers=None
    ),
    "start_run_handlers": lambda run_id, a, b, c, d: scoria.start_run(
        IDENTITY, initial_step={"kind": "work"}, handlers=a
    ),
    "get_run": lambda run_id, a, b, c, d: scoria.get_run(real(a, run_id), tenant_id=b),
    "get_run_detail": lambda run_id, a, b, c, d: scoria.get_run_detail(real(a, run_id), identity=b),
    "list_runs_for_session": lambda run_id, a, b, c, d: scoria.list_runs_for_session(
        a, limit=b, before=real(c, run_id), identity=d
    ),
    "resume_run": lambda run_id, a, b, c, d: scoria.resume_run(
        real(a, run_id), handlers=b, tenant_id=c
    ),
    "dispatch": lambda run_id, a, b, c, d: scoria.dispatch(real(a, run_id), handlers=b, identity=c),
    "approve_run": lambda run_id, a, b, c, d: scoria.approve_run(
        real(a, run_id), decided_by=b, note=c, tenant_id=d
    ),
    "reject_run": lambda run_id, a, b, c, d: scoria.reject_run(
        real(a, run_id), decided_by=b, reason=c, identity=d
    ),
    "cancel_run": lambda run_id, a, b, c, d: scoria.cancel_run(
        real(a, run_id), cancelled_by=b, reason=c
    ),
    "start_handoff_run": lambda run_id, a, b, c, d: scoria.start_handoff_run(
        IDENTITY,
        a,
        root_role_id=b,
        delegated_kind="review",
        handoff_input=c,
        projected_context=d,
        capability_tags=a,
    ),
    "start_handoff_run_kind": lambda run_id, a, b, c, d: scoria.start_handoff_run(
        a, "critic", root_role_id="planner", delegated_kind=b, handoff_input=c, projected_context=d
    ),
}


@given(value=junk)
@settings(max_examples=300, deadline=None)
def test_identity_of_anything(value: Any) -> None:
    try:
        found = scoria.identity(value)
    except scoria.InvalidIdentity:
        return
    for field in (found.actor_id, found.tenant_id, found.session_id):
        assert field is None or (isinstance(field, str) and field == field.strip() and field)
    assert isinstance(found.metadata, dict)


@pytest.mark.parametrize("verb", sorted(VERBS))
@SETTINGS
@given(a=st.one_of(st.just(REAL_RUN), junk), b=junk, c=junk, d=junk)
def test_verbs_raise_only_scoria_errors_and_write_nothing_when_rejecting(
    app: Flask, verb: str, a: Any, b: Any, c: Any, d: Any
) -> None:
    call_on_a_paused_run(app, verb, a, b, c, d)


def call_on_a_paused_run(app: Flask, verb: str, *arguments: Any) -> None:
    """Call ``verb`` next to a paused run: it raises only ScoriaError, and writes nothing
    when it does; the run still reads back whole."""
    engine = app.extensions["scoria"].storage(app).engine
    with app.app_context():
        run_id = paused_run_id()
        before = row_counts(engine)
        try:
            VERBS[verb](run_id, *arguments)
        except scoria.ScoriaError:
            assert row_counts(engine) == before
        assert scoria.get_run_detail(run_id).summary.run_id == run_id


SAFE_WORD = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)


def camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part.capitalize() for part in rest)


def kebab_title(key: str) -> str:
    return "-".join(part.capitalize() for part in key.split("_"))


unsafe_keys = st.one_of(
    st.sampled_from(UNSAFE_NAMES),
    st.builds(lambda word, suffix: word + suffix, SAFE_WORD, st.sampled_from(UNSAFE_SUFFIXES)),
    st.builds(lambda prefix, word: prefix + word, st.sampled_from(UNSAFE_PREFIXES), SAFE_WORD),
).flatmap(lambda key: st.sampled_from([key, camel(key), kebab_title(key), key.upper()]))

safe_keys = st.one_of(
    SAFE_WORD,
    st.sampled_from(["max_tokens", "prompt_tokens", "session_id", "draft_answer", "task"]),
).filter(lambda key: key not in UNSAFE_NAMES)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),
)


def trees(keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        json_leaves,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3)
        ),
        max_leaves=12,
    )


safe_contexts = st.dictionaries(safe_keys, trees(safe_keys), max_size=4)


@st.composite
def unsafe_contexts(draw: st.DrawFn) -> dict[str, Any]:
    """A safe tree with one unsafe key planted at a random depth."""
    value: Any = {draw(unsafe_keys): draw(trees(safe_keys))}
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            value = [*draw(st.lists(trees(safe_keys), max_size=2)), value]
        else:
            value = {**draw(safe_contexts), draw(SAFE_WORD.map(lambda w: w + "_wrap")): value}
    if not isinstance(value, dict):
        value = {"wrapped": value}
    return value


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    return 0


def start_handoff(context: Any) -> scoria.RunSummary:
    return scoria.start_handoff_run(
        IDENTITY,
        "critic",
        root_role_id="planner",
        delegated_kind="review",
        handoff_input={"brief": "check"},
        projected_context=context,
    )


@SETTINGS
@given(context=unsafe_contexts())
def test_unsafe_key_at_any_depth_is_refused(app: Flask, context: dict[str, Any]) -> None:
    assume(depth(context) <= 16)
    engine = app.extensions["scoria"].storage(app).engine
    before = row_counts(engine)
    with app.app_context(), pytest.raises(scoria.InvalidHandoff) as info:
        start_handoff(context)
    assert info.value.code == "unsafe_projected_context"
    assert row_counts(engine) == before


@SETTINGS
@given(context=safe_contexts)
@example(context={"big": 8.670984844556107e16, "huge": -1e300, "tiny": 5e-324, "zero": -0.0})
def test_safe_contexts_are_stored_unchanged(app: Flask, context: dict[str, Any]) -> None:
    assume(depth(context) <= 16)
    with app.app_context():
        run = start_handoff(context)
        detail = scoria.get_run_detail(run.run_id)
    assert detail.delegated_handoffs[0].projected_context == context
    assert detail.steps[1].projected_context == context


#: What no backend stores unchanged: integers past JSON's 4,300 digits, NUL, lone surrogates.
plain_texts = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


def huge_int(digits: int, negative: bool, low: int) -> int:
    value = 10 ** (digits - 1) + low
    return -value if negative else value


# Built from a digit count: Python cannot even repr these (nor, so, Hypothesis).
huge_ints = st.builds(huge_int, st.integers(4301, 5000), st.booleans(), st.integers(0, 10**6))
nul_texts = st.builds(lambda a, b: f"{a}\x00{b}", plain_texts, plain_texts)
surrogate_texts = st.builds(
    lambda a, s, b: a + s + b,
    plain_texts,
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    plain_texts,
)
unstorable_texts = st.one_of(nul_texts, surrogate_texts)
unstorable_leaves = st.one_of(huge_ints, unstorable_texts)
#: A JSON-like tree with at least one unstorable leaf (or key) in it.
unstorable_trees = st.recursive(
    unstorable_leaves,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=2).flatmap(
            lambda items: st.permutations([*items, "ok", 1])
        ),
        st.dictionaries(
            st.sampled_from(["metadata", "kind", "payload", "actor_id", "note", "x"]),
            children,
            min_size=1,
            max_size=2,
        ),
        st.builds(lambda key, value: {key: value}, unstorable_texts, json_leaves),
    ),
    max_leaves=4,
)
#: Arguments that a verb might take, each holding something unstorable somewhere.
unstorable_arguments = st.one_of(
    unstorable_trees,
    unstorable_trees.map(lambda value: {**IDENTITY, "metadata": {"payload": value}}),
    unstorable_trees.map(lambda value: {"metadata": value}),
    unstorable_leaves.map(lambda value: {**IDENTITY, "actor_id": value}),
    unstorable_leaves.map(lambda value: {"kind": "work", "role_id": value}),
)
UNSTORABLE_SETTINGS = settings(SETTINGS, max_examples=25)


@pytest.mark.parametrize("verb", sorted(VERBS))
@UNSTORABLE_SETTINGS
@given(
    a=st.one_of(st.just(REAL_RUN), unstorable_arguments),
    b=st.one_of(unstorable_arguments, junk),
    c=unstorable_arguments,
    d=st.one_of(unstorable_arguments, st.none()),
)
def test_verbs_refuse_what_a_backend_cannot_store(
    app: Flask, verb: str, a: Any, b: Any, c: Any, d: Any
) -> None:
    call_on_a_paused_run(app, verb, a, b, c, d)


@pytest.mark.parametrize(
    "run_id", [10**5000, -(10**4301), 2**128, 0], ids=["5001-digits", "4302-digits", "2**128", "0"]
)
def test_integer_run_ids_are_not_found(app: Flask, run_id: int) -> None:
    with app.app_context():
        for call in (scoria.get_run, scoria.get_run_detail, scoria.dispatch, scoria.resume_run):
            with pytest.raises(scoria.RunNotFound):
                call(run_id)  # type: ignore[operator]


@SETTINGS
@given(value=unstorable_trees, shape=st.sampled_from(["dict", "succeed", "wait", "fail", "raise"]))
def test_handler_results_a_backend_cannot_store_fail_the_step(
    app: Flask, value: Any, shape: str
) -> None:
    def work(step: scoria.StepView, run: scoria.RunSummary) -> Any:
        if shape == "dict":
            return {"answer": value}
        if shape == "succeed":
            return scoria.Succeed(value)
        if shape == "wait":
            return scoria.WaitForApproval("publish", {"arguments": value})
        if shape == "fail":
            return scoria.Fail({"error": value})
        raise RuntimeError(value)

    with app.app_context():
        run = scoria.start_run(IDENTITY, initial_step={"kind": "work"}, handlers={"work": work})
        detail = scoria.get_run_detail(run.run_id)
    assert run.status == scoria.RunStatus.FAILED
    assert [step.status for step in detail.steps] == [scoria.StepStatus.FAILED]
    expected = "RuntimeError" if shape == "raise" else "invalid_handler_result"
    assert detail.steps[0].error_envelope["type"] == expected


def quoted(text: str) -> str:
    """``text`` percent-encoded as UTF-8, lone surrogates and all."""
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")


@pytest.fixture
def operator_client(app: Flask) -> Any:
    app.extensions["scoria"].operator_scope(
        lambda: {"tenant_id": IDENTITY["tenant_id"], "actor_id": "ops"}
    )
    return app.test_client()


route_texts = st.one_of(
    unstorable_texts, st.integers(4301, 5000).map(lambda digits: "9" * digits), st.just(REAL_RUN)
)


@SETTINGS
@given(text=route_texts, name=st.sampled_from(["status", "session", "actor", "role", "after"]))
def test_operator_routes_answer_unstorable_text_without_a_server_error(
    app: Flask, operator_client: Any, text: str, name: str
) -> None:
    engine = app.extensions["scoria"].storage(app).engine
    with app.app_context():
        run_id = paused_run_id()
    text = real(text, run_id)
    before = row_counts(engine)
    with operator_client.session_transaction() as session:
        session["_scoria_csrf"] = "token"
    with app.test_request_context():
        from flask_scoria.operator.access import _serializer

        token = _serializer().dumps("token")
    gets = [
        f"/scoria/workflows?{name}={quoted(text)}",
        f"/scoria/sessions/{quoted(text)}",
        f"/scoria/workflows/{quoted(text)}",
        f"/scoria/workflows/{quoted(text)}/status.json",
        f"/scoria/approvals?after={quoted(text)}",
    ]
    for url in gets:
        # A redirect is fine too (an encoded ``/`` can make a path that routing tidies).
        assert operator_client.get(url).status_code in (200, 308, 400, 404), url

    def post(path: str, **form: str) -> int:
        body = "&".join(f"{key}={quoted(value)}" for key, value in form.items())
        response = operator_client.post(
            path, data=body, content_type="application/x-www-form-urlencoded"
        )
        return response.status_code  # type: ignore[no-any-return]

    for action in ("approve", "reject"):
        path = f"/scoria/workflows/{run_id}/{action}"
        assert post(path, csrf_token=token, approval_id=text) in (303, 400), action
        assert post(path, csrf_token=token, approval_id="x", note=text) in (303, 400), action
        path = f"/scoria/workflows/{quoted(text)}/{action}"
        assert post(path, csrf_token=token, approval_id="x") in (303, 308, 400, 404), action
    assert row_counts(engine) == before
