"""generate, on_token, stream and chat: text, tokens, finish reasons, stop rules."""

import pytest

import phi3

NO_STOP = dict(stop_token_ids=[])  # generate until max_tokens (the demo model rarely emits eos)


def stop_ids(demo):
    t = demo.tokenizer
    return {t.eos_token_id, t.token_to_id("<|end|>")}


def test_generate_greedy_is_deterministic(demo, chat_session):
    prompt = chat_session.tokens
    f = chat_session.fork()
    r = chat_session.generate(max_tokens=20, **NO_STOP)
    assert isinstance(r, phi3.GenerationResult)
    assert r.finish_reason == "length" and len(r.tokens) == 20
    assert r.text and isinstance(r.text, str)
    assert chat_session.tokens[-20:] == r.tokens
    assert len(chat_session) > len(prompt) + 20  # the assistant prompt was added first
    assert f.generate(20, **NO_STOP).tokens == r.tokens
    s = r.stats
    assert s.generated_tokens == 20 and s.prompt_tokens > 0
    assert s.time_to_first_token > 0 and s.decode_tokens_per_s > 0
    assert s.as_dict()["generated_tokens"] == 20
    assert "GenerationResult" in repr(r)


def test_streamed_text_equals_decoded_tokens(demo, chat_session):
    seen = []
    r = chat_session.generate(max_tokens=40, on_token=lambda text, tok: seen.append((text, tok)))
    assert "".join(t for t, _ in seen) == r.text
    assert [tok for _, tok in seen if tok is not None] == [t for t in r.tokens if t not in stop_ids(demo)]
    # The text is what the tokenizer decodes, after the prompt's own text.
    prompt = chat_session.tokens[: len(chat_session) - len(r.tokens)]
    gen = [t for t in r.tokens if t not in stop_ids(demo)]
    full = demo.tokenizer.decode(prompt + gen, skip_special_tokens=True)
    head = demo.tokenizer.decode(prompt, skip_special_tokens=True)
    assert full == head + r.text


def test_stream_equals_generate(demo, chat_session):
    f = chat_session.fork()
    it = chat_session.stream(max_tokens=40, **NO_STOP)
    assert iter(it) is it
    chunks = list(it)
    assert all(isinstance(c, str) and c for c in chunks)
    r = f.generate(max_tokens=40, **NO_STOP)
    assert "".join(chunks) == r.text
    assert it.result is not None and it.result.tokens == r.tokens
    assert it.finish_reason == "length"
    assert chat_session.tokens == f.tokens
    assert it.session is chat_session


def test_on_token_true_stops(chat_session):
    calls = []

    def on_token(text, token):
        calls.append(token)
        return len(calls) == 3

    r = chat_session.generate(max_tokens=50, on_token=on_token, **NO_STOP)
    assert r.finish_reason == "callback"
    assert len(r.tokens) == 3 and calls[:3] == r.tokens


def test_on_token_exception_propagates_and_session_survives(chat_session):
    n = len(chat_session)

    def boom(text, token):
        raise RuntimeError("host failed")

    with pytest.raises(RuntimeError, match="host failed"):
        chat_session.generate(max_tokens=10, on_token=boom)
    assert len(chat_session) > n  # the sampled token stays
    assert chat_session.generate(max_tokens=3, **NO_STOP).tokens


def test_stream_on_token_and_exception(chat_session):
    seen = []
    chunks = list(chat_session.stream(max_tokens=10, on_token=lambda t, k: seen.append(t), **NO_STOP))
    assert "".join(seen) == "".join(chunks)

    def boom(text, token):
        raise ValueError("stop here")

    with pytest.raises(ValueError, match="stop here"):
        list(chat_session.stream(max_tokens=10, on_token=boom))
    assert chat_session.generate(max_tokens=2, **NO_STOP).tokens


def test_stop_strings(demo, chat_session):
    free = chat_session.fork().generate(max_tokens=40, **NO_STOP)
    words = free.text.split()
    assert len(words) > 3
    stop = " " + words[2]
    r = chat_session.generate(max_tokens=40, stop=stop, **NO_STOP)
    assert r.finish_reason == "stop_string"
    assert stop not in r.text and free.text.startswith(r.text)
    r2 = chat_session.fork().generate(max_tokens=5, stop=["zzzz", "yyyy"], **NO_STOP)
    assert r2.finish_reason == "length"


def test_sampling_with_seed_is_reproducible(chat_session):
    opts = dict(max_tokens=15, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=1234, **NO_STOP)
    a = chat_session.fork().generate(**opts)
    b = chat_session.fork().generate(**opts)
    assert a.tokens == b.tokens
    c = chat_session.fork().generate(**{**opts, "seed": 99})
    assert c.tokens != a.tokens
    d = chat_session.fork().generate(
        max_tokens=5, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5,
        logit_bias={5: 2.0}, **NO_STOP
    )
    assert len(d.tokens) == 5


def test_eos_stops_by_default(demo):
    s = demo.session()
    s.append_message("user", "Hello")
    end = demo.tokenizer.token_to_id("<|end|>")
    # Force <|end|> with a logit bias: generation ends at once on the stop token.
    r = s.generate(max_tokens=10, logit_bias={end: 1000.0})
    assert r.finish_reason == "eos" and r.tokens == [end] and r.text == ""


def test_chat(demo):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    r = demo.chat(messages, max_tokens=12, **NO_STOP)
    assert isinstance(r, phi3.GenerationResult) and len(r.tokens) == 12
    s = demo.session()
    for m in messages:
        s.append_message(m["role"], m["content"])
    assert s.generate(max_tokens=12, **NO_STOP).tokens == r.tokens
    it = demo.chat(messages, stream=True, max_tokens=12, **NO_STOP)
    assert isinstance(it, phi3.TokenStream)
    assert "".join(it) == r.text
    assert it.session.tokens[-12:] == r.tokens
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    assert demo.chat(parts, max_tokens=5, **NO_STOP).tokens == demo.chat(messages[1:], max_tokens=5, **NO_STOP).tokens


def test_stream_close_cancels_and_session_stays_usable(chat_session):
    n = len(chat_session)
    it = chat_session.stream(max_tokens=500, **NO_STOP)
    first = next(it)
    assert first
    it.close()
    it.close()  # idempotent
    assert list(it) == []
    assert it.finish_reason == "cancelled" and it.result is None
    grown = len(chat_session)
    assert n < grown < n + 500
    assert chat_session.generate(max_tokens=3, **NO_STOP).tokens  # not busy any more
    with chat_session.stream(max_tokens=500, **NO_STOP) as it2:
        next(it2)
    assert chat_session.generate(max_tokens=1, **NO_STOP).tokens
    for _chunk in chat_session.stream(max_tokens=500, **NO_STOP):
        break  # dropping the iterator cancels it
    assert chat_session.generate(max_tokens=1, **NO_STOP).tokens


def test_on_token_runs_on_the_calling_thread(chat_session):
    import threading

    idents = set()
    chat_session.generate(max_tokens=5, on_token=lambda t, k: idents.add(threading.get_ident()))
    assert idents == {threading.get_ident()}
