// The C# wrapper test program (examples/csharp/Phi3.cs): runs every test against the built-in
// demo model, prints one line per test, then "C#: N passed, M failed". Exit status 1 on failure.
// Built together with Phi3.cs (one assembly), so it can also check the internal struct layouts
// against the library's _init functions.

using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Runtime.InteropServices;
using System.Threading;
using Phi3;

public static class Tests
{
    private sealed class CheckFailed : Exception
    {
        public CheckFailed(string message) : base(message) { }
    }

    private sealed class CallbackError : Exception
    {
        public readonly int Value;
        public CallbackError(int value) : base("callback failed") { Value = value; }
    }

    private static void Check(bool condition, string what)
    {
        if (!condition) throw new CheckFailed("check failed: " + what);
    }

    private static Phi3Exception ExpectStatus(Phi3Status status, Action body)
    {
        try
        {
            body();
        }
        catch (Phi3Exception e)
        {
            Check(e.Status == status, "expected " + status + ", got " + e.Status + " (" + e.Message + ")");
            Check(e.Message.Length > 0, "error message is empty");
            return e;
        }
        throw new CheckFailed("expected Phi3Exception " + status);
    }

    private static Phi3Session ChatSession(Phi3Model model)
    {
        Phi3Session session = model.NewSession();
        session.AppendMessage("user", "Hello");
        return session;
    }

    private static void GenerateStreams(Phi3Model model)
    {
        using (Phi3Session session = ChatSession(model))
        {
            var options = new GenerateOptions { MaxTokens = 16 };
            var pieces = new List<string>();
            var tokens = new List<int>();
            GenerateResult r = session.Generate(options, (text, token) =>
            {
                pieces.Add(text);
                if (token >= 0) tokens.Add(token);
                return true;
            });
            string streamed = string.Concat(pieces);
            Check(pieces.Count > 0, "callback called");
            Check(streamed.Length > 0, "streamed text is not empty");
            Check(streamed == r.Text, "result text equals the streamed text");
            Check(tokens.SequenceEqual(r.Tokens), "result tokens equal the streamed tokens");
            Check(r.Tokens.Length > 0 && r.GeneratedTokens >= r.Tokens.Length, "token counts");
            Check(r.GeneratedTokens <= options.MaxTokens, "max tokens respected");
            Check(r.PromptTokens > 0, "prompt tokens counted");

            using (Phi3Session again = ChatSession(model))
            {
                GenerateResult r2 = again.Generate(options);
                Check(r2.Text == r.Text, "greedy is deterministic");
            }

            // Stopping from the callback is not an error.
            using (Phi3Session stop = ChatSession(model))
            {
                int n = 0;
                GenerateResult r3 = stop.Generate(options, (text, token) => token < 0 || ++n < 2);
                Check(r3.FinishReason == FinishReason.Callback, "finish reason callback");
                Check(r3.Tokens.Length == 2, "stopped after two tokens");
            }
        }
    }

    private static void CallbackExceptionPropagates(Phi3Model model)
    {
        // No stop tokens: generation runs to MaxTokens, so the throw always happens.
        var options = new GenerateOptions { MaxTokens = 32, StopTokenIds = new int[0] };
        using (Phi3Session session = ChatSession(model))
        {
            var seen = new List<int>();
            int callsAfterThrow = 0;
            bool thrown = false;
            CallbackError original = null;
            try
            {
                session.Generate(options, (text, token) =>
                {
                    if (thrown) callsAfterThrow++;
                    if (token >= 0)
                    {
                        seen.Add(token);
                        if (seen.Count == 3)
                        {
                            thrown = true;
                            original = new CallbackError(42);
                            throw original;
                        }
                    }
                    return true;
                });
                throw new CheckFailed("Generate did not rethrow");
            }
            catch (CallbackError e)
            {
                Check(ReferenceEquals(e, original), "the same exception object comes back");
                Check(e.Value == 42, "payload kept");
                Check(e.StackTrace != null && e.StackTrace.Contains("CallbackExceptionPropagates"),
                      "original stack trace kept");
            }
            Check(callsAfterThrow == 0, "no callbacks after the throw");

            // The session holds exactly the prompt and the three tokens seen before the throw.
            int[] history = session.Tokens();
            using (Phi3Session reference = ChatSession(model))
            {
                GenerateResult full = reference.Generate(options);
                int prompt = reference.Length - full.Tokens.Length;
                Check(history.Length == prompt + 3, "prompt plus the tokens before the throw");
                Check(history.Skip(prompt).SequenceEqual(seen), "the tokens the callback saw stayed");
                Check(full.Tokens.Take(3).SequenceEqual(seen), "the same tokens a clean run samples");
            }

            int len = session.Length;
            GenerateResult r = session.Generate(new GenerateOptions { MaxTokens = 4, StopTokenIds = new int[0] });
            Check(r.Tokens.Length == 4 && session.Length == len + 4, "session usable after the exception");
        }
    }

    private static void CallbackExceptionEdges(Phi3Model model)
    {
        var options = new GenerateOptions { MaxTokens = 8, StopTokenIds = new int[0] };

        // A Phi3Exception thrown inside the callback (BUSY from calling into the generating
        // session) comes back as itself; the session is usable afterwards.
        using (Phi3Session session = ChatSession(model))
        {
            Phi3Exception busy = null;
            try
            {
                session.Generate(options, (text, token) =>
                {
                    session.AppendText("re-entrant");
                    return true;
                });
                throw new CheckFailed("Generate did not rethrow");
            }
            catch (Phi3Exception e)
            {
                busy = e;
            }
            Check(busy.Status == Phi3Status.Busy, "BUSY from the re-entrant call, got " + busy.Status);
            int len = session.Length;
            session.AppendText(" more");
            Check(session.Length > len, "append after the exception");
            Check(session.Generate(options).Tokens.Length == 8, "generate after the exception");
        }

        // A throw from the final call (token -1, held-back text) is rethrown too, with every token
        // kept. A stop string of the reply's last character plus an unlikely one holds that
        // character back until the end.
        using (Phi3Session a = ChatSession(model))
        using (Phi3Session b = a.Fork())
        {
            GenerateResult free = a.Generate(options);
            Check(free.Text.Length > 0, "the reply has text");
            int last = free.Text.Length - 1;
            if (last > 0 && char.IsLowSurrogate(free.Text[last])) last--;
            string tail = free.Text.Substring(last);
            var held = new GenerateOptions
            {
                MaxTokens = 8,
                StopTokenIds = new int[0],
                Stop = new[] { tail + "\u0001" },
            };
            var tokens = new List<int>();
            string finalText = null;
            try
            {
                b.Generate(held, (text, token) =>
                {
                    if (token >= 0)
                    {
                        tokens.Add(token);
                        return true;
                    }
                    finalText = text;
                    throw new InvalidOperationException("final call");
                });
                throw new CheckFailed("Generate did not rethrow");
            }
            catch (InvalidOperationException e)
            {
                Check(e.Message == "final call", "the final call's exception");
            }
            Check(finalText == tail, "the final call delivered the held-back character");
            Check(tokens.SequenceEqual(free.Tokens), "every token was delivered before it");
            Check(b.Tokens().SequenceEqual(a.Tokens()), "every token stayed in the session");
            Check(b.Generate(options).Tokens.SequenceEqual(a.Generate(options).Tokens),
                  "goes on as the other does");
        }
    }

    private static void Cancel(Phi3Model model)
    {
        using (Phi3Session session = ChatSession(model))
        {
            int tokens = 0;
            GenerateResult r = session.Generate(new GenerateOptions { MaxTokens = 32 }, (text, token) =>
            {
                if (token >= 0 && ++tokens == 2) session.Cancel();
                return true;
            });
            Check(r.FinishReason == FinishReason.Cancelled, "finish reason cancelled");
            Check(tokens >= 2 && tokens < 32, "stopped early");
            GenerateResult again = session.Generate(new GenerateOptions { MaxTokens = 3 });
            Check(again.FinishReason != FinishReason.Cancelled, "usable after cancel");
        }
    }

    private static void ThreadsBusyAndCancel(Phi3Model model)
    {
        using (Phi3Session session = ChatSession(model))
        {
            var started = new ManualResetEventSlim(false);
            var done = new ManualResetEventSlim(false);
            Phi3Exception busy = null;
            var other = new Thread(() =>
            {
                started.Wait();
                try
                {
                    session.AppendText("more"); // concurrent second call: Busy
                }
                catch (Phi3Exception e)
                {
                    busy = e;
                }
                session.Cancel(); // from another thread
                done.Set();
            });
            other.Start();
            GenerateResult r;
            try
            {
                r = session.Generate(new GenerateOptions { MaxTokens = 200 }, (text, token) =>
                {
                    started.Set();
                    done.Wait(TimeSpan.FromSeconds(30));
                    return true;
                });
            }
            finally
            {
                started.Set();
                other.Join();
            }
            Check(busy != null && busy.Status == Phi3Status.Busy, "concurrent call is Busy");
            Check(r.FinishReason == FinishReason.Cancelled, "cancelled from another thread");
            Check(r.Tokens.Length < 200, "stopped early");
            int len = session.Length;
            session.AppendText("more");
            Check(session.Length > len, "usable afterwards");
        }
    }

    private static void MissingFolderIsIo(Phi3Model model)
    {
        Phi3Exception e = ExpectStatus(Phi3Status.Io, () => Phi3Model.Load("/nonexistent/phi3-model-folder"));
        Check(e.Message.Contains("phi3-model-folder"), "message names the folder");
        Check(e.StatusName.Contains("IO"), "status name");

        using (Phi3Session session = model.NewSession())
        {
            session.AppendText("Hello");
            int[] before = session.Tokens();
            ExpectStatus(Phi3Status.TokenOutOfRange, () => session.AppendTokens(new[] { 1, -5 }));
            ExpectStatus(Phi3Status.TokenOutOfRange, () => session.AppendTokens(new[] { model.VocabSize + 100 }));
            Check(session.Tokens().SequenceEqual(before), "failed call leaves the session unchanged");
            ExpectStatus(Phi3Status.InvalidArgument, () => session.AppendMessage("user", "a\0b"));
            ExpectStatus(Phi3Status.Io, () => Phi3Session.Load(model, "/nonexistent/phi3-session.bin"));
        }
    }

    private static void QuantizedWeights(Phi3Model unused)
    {
        using (Phi3Model model = Phi3Model.LoadDemo(new ModelOptions { Weights = "int8" }))
        using (Phi3Session session = model.NewSession())
        {
            session.AppendText("Hello");
            Check(session.Generate(new GenerateOptions { MaxTokens = 2 }).Tokens.Length > 0, "int8 generates");
        }
        bool threw = false;
        try
        {
            Phi3Model.LoadDemo(new ModelOptions { Weights = "int3" }).Dispose();
        }
        catch (Phi3Exception e)
        {
            threw = e.Status == Phi3Status.InvalidArgument && e.Message.Contains("int3");
        }
        Check(threw, "an unknown weights format is InvalidArgument naming it");
    }

    private static void DisposeTwiceIsSafe(Phi3Model unused)
    {
        Phi3Model model = Phi3Model.LoadDemo();
        Phi3Session session = model.NewSession();
        Phi3Session fork = session.Fork();
        model.Dispose();
        model.Dispose();
        Check(model.IsClosed, "model closed");
        // The session keeps the native model alive.
        session.AppendMessage("user", "Hello");
        Check(session.Generate(new GenerateOptions { MaxTokens = 2 }).Tokens.Length > 0, "session outlives model");
        session.Dispose();
        session.Dispose();
        Check(session.IsClosed, "session closed");
        bool threw = false;
        try
        {
            Check(session.Length >= 0, "unreachable");
        }
        catch (ObjectDisposedException)
        {
            threw = true;
        }
        Check(threw, "a disposed session throws ObjectDisposedException");
        fork.Dispose();
        // Sessions left to the finalizer are freed once too.
        for (int i = 0; i < 4; i++)
        {
            using (Phi3Model m = Phi3Model.LoadDemo())
            {
                m.NewSession();
            }
        }
        GC.Collect();
        GC.WaitForPendingFinalizers();
    }

    private static void ForkSaveLoad(Phi3Model model)
    {
        using (Phi3Session session = ChatSession(model))
        {
            var options = new GenerateOptions { MaxTokens = 6 };
            session.Generate(options);
            int[] history = session.Tokens();
            Check(history.Length == session.Length, "Tokens() matches Length");
            using (Phi3Session fork = session.Fork())
            {
                Check(fork.Tokens().SequenceEqual(history), "fork has the same tokens");
                GenerateResult a = session.Generate(options);
                GenerateResult b = fork.Generate(options);
                Check(a.Tokens.SequenceEqual(b.Tokens), "fork continues the same way");

                string path = Path.Combine(Path.GetTempPath(), "phi3-cs-test-" + Guid.NewGuid().ToString("N") + ".session");
                try
                {
                    fork.Save(path);
                    using (Phi3Session loaded = Phi3Session.Load(model, path))
                    {
                        Check(loaded.Tokens().SequenceEqual(fork.Tokens()), "loaded session has the same tokens");
                        GenerateResult c = fork.Generate(options);
                        GenerateResult d = loaded.Generate(options);
                        Check(c.Tokens.SequenceEqual(d.Tokens), "loaded session continues the same way");
                        Check(loaded.Logits().SequenceEqual(fork.Logits()), "same logits");
                    }
                }
                finally
                {
                    File.Delete(path);
                }
            }
        }
    }

    private static void KvMemoryAndPriority(Phi3Model model)
    {
        KvUsage unlimited = model.KvUsage();
        Check(unlimited.BlockTokens > 0 && unlimited.BlockBytes > 0, "block size");
        Check(unlimited.MaxBlocks == 0, "no budget by default");
        using (Phi3Model small = Phi3Model.LoadDemo(new ModelOptions { KvMemory = 2 * unlimited.BlockBytes }))
        using (Phi3Session session = small.NewSession(new SessionOptions { Priority = 3 }))
        {
            Check(small.KvUsage().MaxBlocks == 2, "budget of two blocks");
            Check(session.Priority == 3, "priority from the options");
            session.Priority = -1;
            Check(session.Priority == -1, "priority set");
            session.AppendTokens(Enumerable.Repeat(5, (int)(2 * unlimited.BlockTokens)).ToArray());
            Check(small.KvUsage().BlocksInUse == 2, "two blocks in use");
            int[] before = session.Tokens();
            Phi3Exception e = ExpectStatus(Phi3Status.OutOfMemory, () => session.AppendTokens(new[] { 6 }));
            Check(e.Message.Contains("KV memory"), "the error names KV memory");
            Check(session.Tokens().SequenceEqual(before), "the session is unchanged");
            using (Phi3Session fork = session.Fork())
            {
                Check(fork.Priority == -1, "the fork keeps the priority");
                Check(small.KvUsage().BlocksInUse == 2, "a fork shares the blocks");
            }
        }
        ExpectStatus(Phi3Status.InvalidArgument, () => Phi3Model.LoadDemo(new ModelOptions { KvMemory = 1 }));
        // A prompt of several prefill chunks; a chunk above 65536 tokens is refused.
        using (Phi3Model byFives = Phi3Model.LoadDemo(new ModelOptions { Device = "cpu", PrefillChunk = 5 }))
        using (Phi3Session s = byFives.NewSession())
        {
            s.AppendTokens(new int[] { 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14 });
            Check(s.Tokens().Length == 12, "a prompt of three chunks is all in the session");
        }
        ExpectStatus(Phi3Status.InvalidArgument, () => Phi3Model.LoadDemo(new ModelOptions { PrefillChunk = 65537 }));
    }

    private static void TokenizeAndLogits(Phi3Model model)
    {
        const string text = "Hello world, the river is green";
        int[] ids = model.Tokenize(text, false);
        Check(ids.Length > 0, "tokens");
        Check(model.Detokenize(ids) == text, "round trip");
        Check(model.Tokenize(text, true).Length == ids.Length + 1, "BOS added");
        Check(model.Tokenize("é and ü", false).Length > 0, "non-ASCII text");
        Check(model.Detokenize(model.Tokenize("é and ü", false)) == "é and ü", "non-ASCII round trip");

        using (Phi3Session session = model.NewSession())
        {
            session.AppendText("Hello world");
            float[] logits = session.Logits();
            Check(logits.Length == model.VocabSize, "logits length");
            int[] tokens = session.Tokens();
            session.Truncate(1);
            Check(session.Length == 1, "truncate");
            session.AppendTokens(tokens.Skip(1).ToArray());
            Check(session.Logits().SequenceEqual(logits), "same history, same logits");
            session.Reset();
            Check(session.Length == 0 && session.Tokens().Length == 0, "reset");

            // The greedy choice alone: the token greedy generation picks next (its stop token
            // included), then the same logits on request.
            session.AppendTokens(tokens);
            float[] full = session.Logits();
            int want;
            using (Phi3Session generating = session.Fork())
            {
                want = generating.Generate(new GenerateOptions { MaxTokens = 1 }).Tokens[0];
            }
            using (Phi3Session greedy = model.NewSession())
            {
                Check(greedy.AppendTokensGreedy(tokens) == want, "greedy choice is generate's");
                // Run again over the last token alone, which may round differently from a pass
                // over the whole prompt: equal to a few ulps.
                float[] again = greedy.Logits();
                float scale = full.Max(x => Math.Abs(x));
                Check(again.Length == full.Length, "logits after a greedy step: length");
                Check(again.Zip(full, (a, b) => Math.Abs(a - b)).Max() <= 1e-4f * scale,
                      "logits after a greedy step");
                ExpectStatus(Phi3Status.TokenOutOfRange, () => greedy.AppendTokensGreedy(new[] { -1 }));
                Check(greedy.Length == tokens.Length, "unchanged after an error");
            }
        }
    }

    private static void StructLayoutsMatchTheLibrary(Phi3Model model)
    {
        // Each _init writes the library's struct_size first; give it room for a larger struct.
        IntPtr buffer = Marshal.AllocHGlobal(1024);
        try
        {
            for (int i = 0; i < 1024; i++) Marshal.WriteByte(buffer, i, 0xAB);
            Native.phi3_generate_options_init(buffer);
            Check(Marshal.ReadInt32(buffer) == Marshal.SizeOf(typeof(Native.GenerateOptions)),
                  "phi3_generate_options size " + Marshal.ReadInt32(buffer) + " vs " + Marshal.SizeOf(typeof(Native.GenerateOptions)));
            var g = (Native.GenerateOptions)Marshal.PtrToStructure(buffer, typeof(Native.GenerateOptions));
            var d = new GenerateOptions();
            Check(g.max_tokens == d.MaxTokens && g.temperature == d.Temperature && g.top_k == d.TopK &&
                  g.top_p == d.TopP && g.min_p == d.MinP && g.repetition_penalty == d.RepetitionPenalty &&
                  g.presence_penalty == d.PresencePenalty && g.frequency_penalty == d.FrequencyPenalty &&
                  g.has_seed == 0 && g.stop == IntPtr.Zero && g.n_stop == UIntPtr.Zero &&
                  g.stop_token_ids == IntPtr.Zero, "GenerateOptions defaults equal phi3_generate_options_init");

            for (int i = 0; i < 1024; i++) Marshal.WriteByte(buffer, i, 0xAB);
            Native.phi3_model_options_init(buffer);
            Check(Marshal.ReadInt32(buffer) == Marshal.SizeOf(typeof(Native.ModelOptions)), "phi3_model_options size");
            var m = (Native.ModelOptions)Marshal.PtrToStructure(buffer, typeof(Native.ModelOptions));
            Check(m.max_context == UIntPtr.Zero, "model options default max_context");

            for (int i = 0; i < 1024; i++) Marshal.WriteByte(buffer, i, 0xAB);
            Native.phi3_session_options_init(buffer);
            Check(Marshal.ReadInt32(buffer) == Marshal.SizeOf(typeof(Native.SessionOptions)), "phi3_session_options size");
            var so = (Native.SessionOptions)Marshal.PtrToStructure(buffer, typeof(Native.SessionOptions));
            Check(so.priority == 0, "session options default priority");
            Check(m.kv_memory_bytes == 0 && m.kv_wait == 0, "model options default KV memory");
        }
        finally
        {
            Marshal.FreeHGlobal(buffer);
        }
        Check(Phi3Library.Version.Length > 0, "version");
        Check(Phi3Library.AbiVersion > 0, "ABI version");
    }

    public static int Main()
    {
        var tests = new List<KeyValuePair<string, Action<Phi3Model>>>
        {
            new KeyValuePair<string, Action<Phi3Model>>("generate_streams", GenerateStreams),
            new KeyValuePair<string, Action<Phi3Model>>("callback_exception_propagates", CallbackExceptionPropagates),
            new KeyValuePair<string, Action<Phi3Model>>("callback_exception_edges", CallbackExceptionEdges),
            new KeyValuePair<string, Action<Phi3Model>>("cancel", Cancel),
            new KeyValuePair<string, Action<Phi3Model>>("threads_busy_and_cancel", ThreadsBusyAndCancel),
            new KeyValuePair<string, Action<Phi3Model>>("missing_folder_is_io", MissingFolderIsIo),
            new KeyValuePair<string, Action<Phi3Model>>("dispose_twice_is_safe", DisposeTwiceIsSafe),
            new KeyValuePair<string, Action<Phi3Model>>("quantized_weights", QuantizedWeights),
            new KeyValuePair<string, Action<Phi3Model>>("fork_save_load", ForkSaveLoad),
            new KeyValuePair<string, Action<Phi3Model>>("tokenize_and_logits", TokenizeAndLogits),
            new KeyValuePair<string, Action<Phi3Model>>("kv_memory_and_priority", KvMemoryAndPriority),
            new KeyValuePair<string, Action<Phi3Model>>("struct_layouts_match_the_library", StructLayoutsMatchTheLibrary),
        };
        int passed = 0, failed = 0;
        try
        {
            using (Phi3Model model = Phi3Model.LoadDemo())
            {
                foreach (var t in tests)
                {
                    try
                    {
                        t.Value(model);
                        Console.WriteLine("ok     " + t.Key);
                        passed++;
                    }
                    catch (Exception e)
                    {
                        Console.WriteLine("FAILED " + t.Key + ": " + e.GetType().Name + ": " + e.Message);
                        Console.WriteLine(e.StackTrace);
                        failed++;
                    }
                }
            }
        }
        catch (Exception e)
        {
            Console.WriteLine("FAILED loading the demo model: " + e);
            failed++;
        }
        Console.WriteLine("C#: " + passed + " passed, " + failed + " failed");
        return failed == 0 ? 0 : 1;
    }
}
