"""Faults from the host side of a generation: an ``on_token`` callback that raises, and a
``stream()`` consumer that raises mid-iteration or abandons the iterator (close, ``del``, garbage
collection). The exception reaches the caller unchanged, the callback is not called again, and
the session keeps the tokens sampled until then and stays usable."""

import gc
import sys
import threading
import time

import pytest

import phi3

NO_STOP = dict(stop_token_ids=[])  # run to max_tokens: the demo model rarely emits eos


class HostError(Exception):
    pass


class HostAbort(BaseException):
    """Not an Exception: must come through as well."""


def reference(demo, max_tokens, texts=None):
    """(prompt length, result) of an undisturbed greedy run on the same chat; `texts`, if given,
    receives the text of each token's on_token call."""
    s = demo.session()
    s.append_message("user", "Hello")
    on_token = None if texts is None else (lambda t, k: k is not None and texts.append(t) and False)
    r = s.generate(max_tokens=max_tokens, on_token=on_token, **NO_STOP)
    return len(s) - len(r.tokens), r


def traceback_codes(exc):
    tb, codes = exc.__traceback__, []
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    return codes


def generate_when_free(session, timeout=30.0, **kwargs):
    """generate, retrying while a stream's worker that was told to stop still holds the session."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return session.generate(**kwargs)
        except phi3.BusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class RaiseAt:
    """on_token that raises `exc` at the `at`-th token and records every call."""

    def __init__(self, at, exc):
        self.at, self.exc = at, exc
        self.tokens, self.calls_after = [], 0

    def __call__(self, text, token):
        if len(self.tokens) >= self.at:
            self.calls_after += 1
        if token is not None:
            self.tokens.append(token)
            if len(self.tokens) == self.at:
                raise self.exc
        return False


# ---- Session.generate(on_token=...) ------------------------------------------------------------


def test_generate_on_token_raise_keeps_the_exception_and_the_tokens(demo, chat_session):
    original = HostError("host failed")
    cb = RaiseAt(3, original)
    with pytest.raises(HostError) as info:
        chat_session.generate(max_tokens=32, on_token=cb, **NO_STOP)
    assert info.value is original
    assert RaiseAt.__call__.__code__ in traceback_codes(info.value)  # raised where it was
    assert cb.calls_after == 0

    prompt, full = reference(demo, 32)
    assert len(chat_session) == prompt + 3
    assert chat_session.tokens[prompt:] == cb.tokens == full.tokens[:3]
    r = chat_session.generate(max_tokens=4, **NO_STOP)
    assert len(r.tokens) == 4 and len(chat_session) == prompt + 7


def test_generate_on_token_base_exception_and_first_token(demo, chat_session):
    n = len(chat_session)
    cb = RaiseAt(1, HostAbort())
    with pytest.raises(HostAbort):
        chat_session.generate(max_tokens=16, on_token=cb, **NO_STOP)
    assert cb.calls_after == 0 and len(cb.tokens) == 1
    assert chat_session.tokens[-1] == cb.tokens[0] and len(chat_session) > n
    assert len(chat_session.generate(max_tokens=2, **NO_STOP).tokens) == 2


def test_generate_on_token_raise_on_the_final_call(demo, chat_session):
    # A stop string of the reply's last character plus an unlikely one holds that character
    # back, so it arrives in the final call (token None); raising there still propagates.
    free = chat_session.fork().generate(max_tokens=8, **NO_STOP)
    assert free.text
    tokens, final = [], []

    def on_token(text, token):
        if token is None:
            final.append(text)
            raise HostError("final")
        tokens.append(token)

    with pytest.raises(HostError, match="final"):
        chat_session.generate(max_tokens=8, stop=free.text[-1] + "\x01", on_token=on_token, **NO_STOP)
    assert final == [free.text[-1]] and tokens == free.tokens
    assert chat_session.tokens[-8:] == free.tokens
    assert len(chat_session.generate(max_tokens=2, **NO_STOP).tokens) == 2


def test_repeated_raises_never_wedge_the_session(chat_session):
    n = len(chat_session)
    for k in range(1, 5):
        with pytest.raises(HostError):
            chat_session.generate(max_tokens=8, on_token=RaiseAt(k, HostError(k)), **NO_STOP)
        assert len(chat_session) >= n + k
        n = len(chat_session)
    assert len(chat_session.generate(max_tokens=3, **NO_STOP).tokens) == 3
    assert len(chat_session) == n + 3


# ---- Session.stream(on_token=...) --------------------------------------------------------------


def test_stream_on_token_raise_is_raised_once_by_next(demo, chat_session):
    original = HostError("in the worker")
    cb = RaiseAt(3, original)
    it = chat_session.stream(max_tokens=32, on_token=cb, **NO_STOP)
    chunks = []
    with pytest.raises(HostError) as info:
        for chunk in it:
            chunks.append(chunk)
    assert info.value is original
    assert cb.calls_after == 0
    assert list(it) == []  # exhausted: the exception is raised once
    texts = []
    prompt, full = reference(demo, 32, texts)
    assert len(chat_session) == prompt + 3
    assert chat_session.tokens[prompt:] == cb.tokens == full.tokens[:3]
    assert "".join(chunks) == "".join(texts[:3])  # the raising token's chunk arrives, then the error
    assert len(chat_session.generate(max_tokens=2, **NO_STOP).tokens) == 2


def test_stream_on_token_raise_is_not_followed_by_more_calls_or_chunks(chat_session):
    # As above, with text held back for the final chunk: neither on_token nor the consumer gets
    # anything after the raise.
    free = chat_session.fork().generate(max_tokens=8, **NO_STOP)
    first, second = HostError("first"), HostError("second")
    calls = []

    def on_token(text, token):
        calls.append(token)
        if len(calls) == 8:
            raise first
        if len(calls) > 8:
            raise second

    stop = free.text[-1] + "\x01"
    it = chat_session.stream(max_tokens=8, stop=stop, on_token=on_token, **NO_STOP)
    chunks = []
    with pytest.raises(HostError) as info:
        for chunk in it:
            chunks.append(chunk)
    assert info.value is first
    assert calls == free.tokens
    assert "".join(chunks) + free.text[-1] == free.text  # the held-back tail never arrives
    assert chat_session.tokens[-8:] == free.tokens
    assert len(chat_session.generate(max_tokens=2, **NO_STOP).tokens) == 2


# ---- the consumer of stream() raises or abandons the iterator --------------------------------


def test_consumer_raises_mid_iteration(demo, chat_session):
    prompt, full = reference(demo, 200)
    consumed = []
    with pytest.raises(HostError):
        for chunk in chat_session.stream(max_tokens=200, **NO_STOP):
            consumed.append(chunk)
            if len(consumed) == 2:
                raise HostError("consumer failed")
    # The iterator went with the loop: the generation stopped and the session is free.
    n = len(chat_session)
    assert prompt < n < prompt + 200
    assert chat_session.tokens[prompt:] == full.tokens[: n - prompt]
    r = chat_session.generate(max_tokens=3, **NO_STOP)
    assert len(r.tokens) == 3 and len(chat_session) == n + 3


def test_consumer_raises_inside_with_block_while_the_traceback_lives(chat_session):
    def consume():
        with chat_session.stream(max_tokens=500, **NO_STOP) as it:
            next(it)
            raise HostError("consumer failed")

    with pytest.raises(HostError) as info:
        consume()
    # The traceback still holds consume's frame (and `it`), but leaving the `with` closed it.
    assert info.traceback is not None
    assert len(chat_session.generate(max_tokens=2, **NO_STOP).tokens) == 2


def test_iterator_kept_alive_by_a_traceback_keeps_the_session_busy_until_released(chat_session):
    def consume():
        it = chat_session.stream(max_tokens=500, **NO_STOP)
        next(it)
        raise HostError("consumer failed")

    with pytest.raises(HostError) as info:
        consume()
    # `it` lives on in the traceback's frame, and the worker still owns the session: a call
    # answers BusyError at once (no deadlock, no waiting) ...
    with pytest.raises(phi3.BusyError):
        chat_session.generate(max_tokens=1, **NO_STOP)
    # ... until the exception and its frames are gone.
    del info
    gc.collect()
    n = len(chat_session)
    assert len(generate_when_free(chat_session, max_tokens=2, **NO_STOP).tokens) == 2
    assert len(chat_session) == n + 2


def test_abandoned_iterator_del_and_close(demo, chat_session):
    prompt, full = reference(demo, 300)
    it = chat_session.stream(max_tokens=500, **NO_STOP)
    next(it)
    del it  # the last reference: the generation is cancelled and joined right here
    n = len(chat_session)
    assert prompt < n < prompt + 500
    assert chat_session.tokens[prompt:] == full.tokens[: n - prompt]
    assert len(chat_session.generate(max_tokens=2, **NO_STOP).tokens) == 2

    it = chat_session.stream(max_tokens=500, **NO_STOP)
    it.close()  # before any next()
    assert list(it) == [] and it.finish_reason == "cancelled"
    assert len(chat_session.generate(max_tokens=2, **NO_STOP).tokens) == 2


def test_abandoned_iterator_in_a_reference_cycle_is_collected(chat_session):
    gc.disable()  # so that the collection happens where the test says
    try:
        it = chat_session.stream(max_tokens=500, **NO_STOP)
        next(it)
        cycle = {"it": it}
        cycle["self"] = cycle
        del it, cycle
        with pytest.raises(phi3.BusyError):  # unreachable but not yet collected: still running
            chat_session.generate(max_tokens=1, **NO_STOP)
        gc.collect()
    finally:
        gc.enable()
    n = len(chat_session)
    assert len(chat_session.generate(max_tokens=2, **NO_STOP).tokens) == 2
    assert len(chat_session) == n + 2


def test_iterator_collected_or_closed_on_its_own_worker_thread(chat_session, monkeypatch):
    # on_token runs on the stream's worker thread. Dropping the iterator there (here: a garbage
    # collection that finds it in a cycle, as any allocation in on_token may trigger) or calling
    # close() from there must not make the worker wait for itself.
    unraisable = []  # an error while freeing the iterator is "ignored": catch it here
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    for how in ("gc", "close"):
        ready, done, failures = threading.Event(), threading.Event(), []
        holder = {}

        def on_token(text, token):
            if done.is_set():
                return False
            try:
                assert ready.wait(10)
                if how == "close":
                    holder["it"].close()
                else:
                    gc.collect()
            except BaseException as e:  # reported below
                failures.append(e)
            done.set()
            return False

        it = chat_session.stream(max_tokens=500, on_token=on_token, **NO_STOP)
        holder["it"] = it
        if how == "gc":
            holder["self"] = holder
            del it, holder
        ready.set()
        assert done.wait(10), how
        assert failures == [] and unraisable == [], how
        r = generate_when_free(chat_session, max_tokens=2, **NO_STOP)
        assert len(r.tokens) == 2, how
