"""Session state: tokens, logits, fork, truncate, reset, save/load."""

import numpy as np
import pytest

import phi3
from conftest import FIXTURES


def test_append_tokens_returns_float32_logits(demo):
    s = demo.session()
    ids = demo.tokenizer.encode("the people of the world")
    logits = s.append_tokens(ids)
    assert isinstance(logits, np.ndarray)
    assert logits.dtype == np.float32 and logits.shape == (demo.vocab_size,)
    assert np.isfinite(logits).all()
    logits[0] = 0.0  # a writable copy, not a view of the session
    assert s.tokens == ids and len(s) == len(ids)
    assert np.array_equal(s.logits(), s.logits())
    # Same tokens in one go or one by one: the same logits.
    t = demo.session()
    for i in ids:
        last = t.append_tokens([i])
    np.testing.assert_allclose(last, s.logits(), rtol=1e-4, atol=1e-4)


def test_append_tokens_greedy_returns_the_greedy_id(demo):
    ids = demo.tokenizer.encode("the people of the world")
    by_logits, by_choice = demo.session(), demo.session()
    emittable = demo.tokenizer.vocab_size  # padding rows past it are never chosen
    token = int(np.argmax(by_logits.append_tokens(ids)[:emittable]))
    assert by_choice.append_tokens_greedy(ids) == token
    for _ in range(4):
        nxt = by_choice.append_tokens_greedy([token])
        token = int(np.argmax(by_logits.append_tokens([token])[:emittable]))
        assert isinstance(nxt, int) and nxt == token
    # Logits asked for afterwards: the last token runs again, to the same values.
    np.testing.assert_array_equal(by_choice.logits(), by_logits.logits())
    with pytest.raises(phi3.TokenOutOfRangeError):
        by_choice.append_tokens_greedy([demo.vocab_size])
    assert by_choice.tokens == by_logits.tokens


def test_append_text_and_message(demo):
    s = demo.session()
    s.append_text("the people")
    assert s.tokens == demo.tokenizer.encode("the people")
    m = demo.session()
    m.append_message("user", "Hello")
    assert m.tokens[0] == demo.tokenizer.bos_token_id
    assert len(m) > 2
    assert m.model is demo
    assert m.max_context == demo.max_context
    assert demo.session(max_context=16).max_context == 16


def test_fork_is_independent(chat_session):
    f = chat_session.fork()
    assert f.tokens == chat_session.tokens
    a = chat_session.generate(max_tokens=12)
    b = f.generate(max_tokens=12)
    assert a.tokens == b.tokens and a.text == b.text
    f.append_text(" more")
    assert len(f) != len(chat_session)


def test_truncate_and_reset(chat_session):
    first = chat_session.generate(max_tokens=8)
    n = len(chat_session) - len(first.tokens)  # the prompt, with the assistant prompt
    assert chat_session.tokens[n:] == first.tokens
    chat_session.truncate(n)
    assert len(chat_session) == n
    with pytest.raises(phi3.InvalidArgumentError, match="truncate"):
        chat_session.truncate(n + 1)
    with pytest.raises(phi3.InvalidArgumentError, match="n_tokens"):
        chat_session.truncate(-1)
    chat_session.reset()
    assert len(chat_session) == 0 and chat_session.tokens == []


def test_save_load_continues_identically(demo, chat_session, tmp_path):
    chat_session.generate(max_tokens=5, temperature=0.8, seed=7)
    path = tmp_path / "chat.phi3session"
    chat_session.save(path)
    loaded = phi3.Session.load(demo, str(path))
    assert loaded.tokens == chat_session.tokens
    np.testing.assert_array_equal(loaded.logits(), chat_session.logits())
    # The sampler state travels too: sampling continues identically.
    a = chat_session.generate(max_tokens=10, temperature=0.8)
    b = loaded.generate(max_tokens=10, temperature=0.8)
    assert a.tokens == b.tokens
    loaded.append_message("user", "again")  # chat history was restored
    assert loaded.generate(max_tokens=3).tokens


def test_load_errors(demo, chat_session, tmp_path):
    with pytest.raises(phi3.IoError):
        phi3.Session.load(demo, tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_bytes(b"definitely not a session file")
    with pytest.raises(phi3.ModelFormatError):
        phi3.Session.load(demo, bad)
    path = tmp_path / "s"
    chat_session.save(path)
    other = phi3.Model(FIXTURES / "mha-f32-tied", device="cpu")
    with pytest.raises(phi3.InvalidArgumentError, match="model"):
        phi3.Session.load(other, path)
    with pytest.raises(phi3.IoError):
        chat_session.save(tmp_path / "no" / "such" / "dir" / "s")


def test_priority(demo):
    s = demo.session()
    assert s.priority == 0
    s.priority = 7
    assert s.priority == 7
    high = demo.session(priority=-2)
    assert high.priority == -2
    s.append_text("the people")
    f = s.fork()
    assert f.priority == 7
    f.priority = 1
    assert (f.priority, s.priority) == (1, 7)
    assert "priority=7" in repr(s)
    with pytest.raises(TypeError):
        demo.session(None, 3)  # keyword-only
    with pytest.raises(OverflowError):
        s.priority = 1 << 40
