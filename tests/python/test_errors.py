"""The exception hierarchy and the error cases: bad arguments raise before any work, failed
calls leave the session as it was."""

import pytest

import phi3

KINDS = {
    "InvalidArgumentError": ("INVALID_ARGUMENT", 1, ValueError),
    "IoError": ("IO", 2, OSError),
    "ModelFormatError": ("MODEL_FORMAT", 3, None),
    "TokenOutOfRangeError": ("TOKEN_OUT_OF_RANGE", 4, ValueError),
    "ContextFullError": ("CONTEXT_FULL", 5, None),
    "OutOfMemoryError": ("OUT_OF_MEMORY", 6, MemoryError),
    "DeviceError": ("DEVICE", 7, None),
    "CancelledError": ("CANCELLED", 8, None),
    "BusyError": ("BUSY", 9, None),
    "BufferTooSmallError": ("BUFFER_TOO_SMALL", 10, None),
    "UnsupportedError": ("UNSUPPORTED", 11, None),
    "InternalError": ("INTERNAL", 12, None),
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_hierarchy(name):
    kind, code, std = KINDS[name]
    cls = getattr(phi3, name)
    assert issubclass(cls, phi3.Phi3Error) and issubclass(phi3.Phi3Error, Exception)
    assert cls.kind == kind and cls.status_code == code
    assert cls.__module__ == "phi3" and cls.__doc__
    if std is not None:
        assert issubclass(cls, std)
    assert name in phi3.__all__


def test_bad_generate_arguments_raise_before_any_work(chat_session):
    tokens = chat_session.tokens
    bad = [
        (dict(max_tokens=-1), phi3.InvalidArgumentError, "max_tokens"),
        (dict(temperature=-0.5), phi3.InvalidArgumentError, "temperature"),
        (dict(top_p=0.0), phi3.InvalidArgumentError, "top_p"),
        (dict(top_k=-3), phi3.InvalidArgumentError, "top_k"),
        (dict(min_p=2.0), phi3.InvalidArgumentError, "min_p"),
        (dict(repetition_penalty=0.0), phi3.InvalidArgumentError, "repetition_penalty"),
        (dict(seed=-1), phi3.InvalidArgumentError, "seed"),
        (dict(stop=[""]), phi3.InvalidArgumentError, "stop"),
        (dict(stop_token_ids=[10**9]), phi3.InvalidArgumentError, "stop_token_ids"),
        (dict(logit_bias={-1: 1.0}), phi3.InvalidArgumentError, "logit_bias"),
        (dict(max_tokens="ten"), TypeError, "max_tokens"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(stop=5), TypeError, "stop"),
        (dict(on_token=42), TypeError, "on_token"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(bogus=1), TypeError, "bogus"),
    ]
    for kwargs, exc, what in bad:
        for call in (chat_session.generate, chat_session.stream):
            with pytest.raises(exc, match=what):
                call(**kwargs)
        assert chat_session.tokens == tokens, kwargs  # not even the assistant prompt was added
    with pytest.raises(phi3.InvalidArgumentError, match="max_tokens"):
        chat_session.model.chat([{"role": "user", "content": "x"}], max_tokens=-1)
    with pytest.raises(TypeError, match="bogus"):
        chat_session.model.chat([{"role": "user", "content": "x"}], bogus=True)


def test_token_out_of_range_leaves_session_unchanged(demo):
    s = demo.session()
    s.append_tokens([1, 5, 6])
    before = s.tokens
    with pytest.raises(phi3.TokenOutOfRangeError, match=rf"tokens\[1\] = {demo.vocab_size} out of range"):
        s.append_tokens([7, demo.vocab_size])
    with pytest.raises(phi3.TokenOutOfRangeError, match=r"tokens\[0\] = -3"):
        s.append_tokens([-3])
    with pytest.raises(TypeError):
        s.append_tokens(["a"])
    with pytest.raises(TypeError):
        s.append_tokens("abc")
    with pytest.raises(phi3.InvalidArgumentError, match="empty"):
        s.append_tokens([])
    assert s.tokens == before


def test_context_full(demo):
    s = demo.session(max_context=8)
    s.append_tokens([1, 2, 3, 4, 5])
    with pytest.raises(phi3.ContextFullError, match="max context of 8"):
        s.append_tokens([6, 7, 8, 9])
    assert len(s) == 5
    r = s.generate(max_tokens=10, stop_token_ids=[])
    assert r.finish_reason == "length" and len(s) == 8


def test_empty_session_and_bad_messages(demo):
    s = demo.session()
    with pytest.raises(phi3.InvalidArgumentError, match="empty"):
        s.generate()
    with pytest.raises(phi3.InvalidArgumentError, match="empty"):
        s.stream()
    with pytest.raises(phi3.InvalidArgumentError, match="empty"):
        s.logits()
    with pytest.raises(phi3.InvalidArgumentError, match=r"messages\[1\]"):
        demo.chat([{"role": "user", "content": "hi"}, {"content": "no role"}])
    with pytest.raises(phi3.InvalidArgumentError, match=r"messages\[0\]\[\"role\"\]"):
        demo.chat([{"role": 3, "content": "hi"}])
    with pytest.raises(TypeError):
        demo.chat("hello")
    with pytest.raises(TypeError):
        demo.chat(["hello"])
    with pytest.raises(TypeError):
        s.append_message("user", None)


def test_errors_carry_messages(demo, tmp_path):
    try:
        phi3.Model(tmp_path / "absent-model")
    except phi3.Phi3Error as e:
        assert "absent-model" in str(e)
        assert e.kind == "IO"
    else:
        pytest.fail("no error")
