"""The GIL is released while the engine works; Ctrl-C and cancel() end generations cleanly."""

import _thread
import threading
import time

import pytest

import phi3

NO_STOP = dict(stop_token_ids=[])


def spin_rate(stop, box):
    while not stop.is_set():
        box[0] += 1


def test_python_thread_runs_while_another_generates(demo, chat_session):
    box, stop = [0], threading.Event()
    spinner = threading.Thread(target=spin_rate, args=(stop, box), daemon=True)
    spinner.start()
    try:
        time.sleep(0.2)
        t0, c0 = time.perf_counter(), box[0]
        time.sleep(0.3)
        alone = (box[0] - c0) / (time.perf_counter() - t0)

        result = {}

        def work():
            t = time.perf_counter()
            c = box[0]
            result["r"] = chat_session.generate(max_tokens=300, **NO_STOP)
            result["rate"] = (box[0] - c) / (time.perf_counter() - t)
            result["secs"] = time.perf_counter() - t

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
    finally:
        stop.set()
        spinner.join()
    assert len(result["r"].tokens) == 300
    # Were the GIL held during generate, the spinner would not advance at all meanwhile.
    assert result["rate"] > 0.1 * alone, (result, alone)
    print(f"spinner rate while generating: {result['rate'] / alone:.0%} of alone")


def test_two_threads_generate_on_two_sessions_at_once(demo):
    def new_session():
        s = demo.session()
        s.append_message("user", "Hello")
        return s

    expected = new_session().generate(max_tokens=200, **NO_STOP).tokens
    stamps = {"a": [], "b": [], "out": {}}

    def work(name):
        s = new_session()
        r = s.generate(max_tokens=200, on_token=lambda t, k: stamps[name].append(time.perf_counter()), **NO_STOP)
        stamps["out"][name] = r.tokens

    threads = [threading.Thread(target=work, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stamps["out"] == {"a": expected, "b": expected}
    a, b = stamps["a"], stamps["b"]
    # Both made progress while the other was running: their token times interleave.
    assert a[0] < b[-1] and b[0] < a[-1]
    assert any(a[0] < x < a[-1] for x in b) or any(b[0] < x < b[-1] for x in a)


def test_busy_while_another_thread_generates(demo, chat_session):
    started = threading.Event()
    out = {}

    def work():
        try:
            chat_session.generate(max_tokens=3000, on_token=lambda t, k: started.set(), **NO_STOP)
        except phi3.CancelledError as e:
            out["err"] = e

    t = threading.Thread(target=work)
    t.start()
    assert started.wait(30)
    with pytest.raises(phi3.BusyError, match="one thread at a time"):
        chat_session.append_text("x")
    with pytest.raises(phi3.BusyError):
        len(chat_session)
    chat_session.cancel()
    t.join()
    assert isinstance(out.get("err"), phi3.CancelledError)
    assert chat_session.generate(max_tokens=2, **NO_STOP).tokens


def test_cancel_from_another_thread(chat_session):
    n = len(chat_session)
    timer = threading.Timer(0.3, chat_session.cancel)
    timer.start()
    t = time.perf_counter()
    with pytest.raises(phi3.CancelledError, match="cancelled"):
        chat_session.generate(max_tokens=4000, **NO_STOP)
    assert time.perf_counter() - t < 20
    assert len(chat_session) > n
    assert len(chat_session.generate(max_tokens=3, **NO_STOP).tokens) == 3


def test_ctrl_c_during_generate_cancels_cleanly(chat_session):
    assert threading.current_thread() is threading.main_thread()
    n = len(chat_session)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        chat_session.generate(max_tokens=4000, **NO_STOP)
    timer.join()
    assert time.perf_counter() - t < 20
    assert len(chat_session) > n
    assert len(chat_session.generate(max_tokens=3, **NO_STOP).tokens) == 3


def test_ctrl_c_during_stream_cancels_cleanly(chat_session):
    n = len(chat_session)
    it = chat_session.stream(max_tokens=4000, **NO_STOP)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in it:
            pass
    timer.join()
    # Still referenced by `it`, yet the generation was cancelled and the session is free.
    assert len(chat_session) > n
    assert len(chat_session.generate(max_tokens=3, **NO_STOP).tokens) == 3
    assert list(it) == []


def test_ctrl_c_during_a_long_prefill_cancels_it(demo):
    s = demo.session()
    s.append_tokens([5, 6])
    timer = threading.Timer(0.1, _thread.interrupt_main)
    timer.start()
    t = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        s.append_tokens([7] * 3000)  # seconds of prefill, cancelled at the next 512-token chunk
    timer.join()
    assert time.perf_counter() - t < 3
    assert s.tokens == [5, 6]  # a failed append leaves the session as it was
    assert s.append_tokens([8]).shape == (demo.vocab_size,)


def test_sessions_in_threads_batch_with_the_results_of_solo_runs():
    # A model of its own, so that its scheduler's counters see only this test.
    model = phi3.Model.demo(device="cpu")
    prompts = ["Hello", "Tell me about the river", "Name three primes", "Hi there"]

    def new_session(prompt, priority=0):
        s = model.session(priority=priority)
        s.append_message("user", prompt)
        return s

    solo = [new_session(p).generate(max_tokens=40, **NO_STOP).tokens for p in prompts]
    before = model.kv_usage()
    out = {}
    barrier = threading.Barrier(len(prompts))

    def work(i):
        s = new_session(prompts[i], priority=i)
        barrier.wait()
        out[i] = s.generate(max_tokens=40, **NO_STOP).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(len(prompts))] == solo
    after = model.kv_usage()
    steps, seqs = after.steps - before.steps, after.sequences - before.sequences
    # Every pass of every session ran, and some passes carried several sessions.
    assert after.max_batch >= 2, after
    assert seqs > steps, (steps, seqs)
    assert after.blocks_in_use == 0  # the sessions are gone, their blocks back in the pool


def in_thread(f, *args):
    """Start f(*args) on a thread; returns (thread, done event, box["r"] = result or exception)."""
    done, box = threading.Event(), {}

    def run():
        try:
            box["r"] = f(*args)
        except Exception as e:  # noqa: BLE001 - the caller checks what came back
            box["r"] = e
        done.set()

    t = threading.Thread(target=run)
    t.start()
    return t, done, box


def test_kv_wait_waits_for_another_thread_to_free_blocks():
    u = phi3.Model.demo(device="cpu").kv_usage()
    bt = u.block_tokens
    model = phi3.Model.demo(device="cpu", kv_memory=2 * u.block_bytes, kv_wait=True)
    a, b = model.session(), model.session()
    a.append_tokens(list(range(5, 5 + 2 * bt)))  # every block

    t, done, box = in_thread(b.append_tokens, [5, 6, 7])
    assert not done.wait(0.3), box  # waiting for a block
    a.reset()  # from this thread: b's pass gets its block
    assert done.wait(60)
    t.join()
    assert not isinstance(box["r"], Exception), box
    assert len(b) == 3

    # A wait ends with CancelledError when its session is cancelled; the session is unchanged.
    a.append_tokens(list(range(5, 5 + bt)))  # a and b one block each: all of them
    t, done, box = in_thread(b.append_tokens, list(range(5, 5 + bt)))  # b needs a second
    assert not done.wait(0.3), box
    while not done.wait(0.05):
        b.cancel()  # repeated: a cancel that lands before the call starts is cleared by it
    t.join()
    assert isinstance(box["r"], phi3.CancelledError), box
    assert "KV memory" in str(box["r"])
    assert len(b) == 3
