// Phi3.cs: a C# wrapper over the phi3 C API (libphi3.so / phi3.dll, include/phi3.h) through
// P/Invoke. Builds with .NET 8 (any SDK-style project) and with Mono's mcs; it uses only
// DllImport with CallingConvention.Cdecl, UnmanagedFunctionPointer delegates and SafeHandle.
//
// Ownership: Phi3Model and Phi3Session are SafeHandles; their ReleaseHandle calls
// phi3_model_free / phi3_session_free, so each native handle is freed exactly once, whether by
// Dispose (any number of times) or by the finalizer. A session keeps its model alive natively,
// so a model may be disposed before its sessions. Using a disposed handle throws
// ObjectDisposedException.
//
// Strings: all UTF-8 conversion is done here by hand (Encoding.UTF8 and byte arrays), so nothing
// depends on the runtime's UnmanagedType.LPUTF8Str support.
//
// Errors: a failed call throws Phi3Exception with the Phi3Status code and the library's message
// (phi3_last_error, read on the calling thread right after the call). A cancelled Generate is
// not an error: it returns with FinishReason.Cancelled (a cancelled Logits or AppendTokens
// throws Phi3Exception with Phi3Status.Cancelled).
//
// Callbacks: an exception thrown by the onToken callback never unwinds through native frames:
// the trampoline catches it, stops generation, and Generate rethrows it (same object, original
// stack trace) once phi3_session_generate has returned. The session stays usable.
//
// Threads: a model may be shared by any number of threads; a session is used by one thread at a
// time (a concurrent call throws Phi3Exception with Phi3Status.Busy); Cancel may be called from
// any thread.

using System;
using System.Collections.Generic;
using System.Runtime.ExceptionServices;
using System.Runtime.InteropServices;
using System.Text;

namespace Phi3
{
    /// <summary>phi3_status codes (PHI3_OK, PHI3_ERR_*).</summary>
    public enum Phi3Status
    {
        Ok = 0,
        InvalidArgument = 1,
        Io = 2,
        ModelFormat = 3,
        TokenOutOfRange = 4,
        ContextFull = 5,
        OutOfMemory = 6,
        Device = 7,
        Cancelled = 8,
        Busy = 9,
        BufferTooSmall = 10,
        Unsupported = 11,
        Internal = 12,
    }

    /// <summary>Why generation ended (PHI3_FINISH_*).</summary>
    public enum FinishReason
    {
        Eos = 0,
        StopString = 1,
        Length = 2,
        Callback = 3,
        Cancelled = 4,
    }

    /// <summary>A failed phi3 call.</summary>
    public class Phi3Exception : Exception
    {
        public Phi3Exception(Phi3Status status, string message) : base(message)
        {
            Status = status;
        }

        /// <summary>The status code the call returned.</summary>
        public Phi3Status Status { get; private set; }

        /// <summary>The code's static name from phi3_status_str, e.g. "PHI3_ERR_IO".</summary>
        public string StatusName
        {
            get { return Utf8.FromNative(Native.phi3_status_str((int)Status)); }
        }

        /// <summary>Throws for a non-OK status, with this thread's phi3_last_error().</summary>
        internal static void Check(int status)
        {
            if (status == (int)Phi3Status.Ok)
            {
                return;
            }
            string message = Utf8.FromNative(Native.phi3_last_error());
            if (string.IsNullOrEmpty(message))
            {
                message = Utf8.FromNative(Native.phi3_status_str(status));
            }
            throw new Phi3Exception((Phi3Status)status, message);
        }
    }

    /// <summary>Options for loading a model (phi3_model_options).</summary>
    public sealed class ModelOptions
    {
        /// <summary>"auto" (default), "cpu", "cuda", "cuda:N".</summary>
        public string Device = "auto";

        /// <summary>0: the model's maximum.</summary>
        public long MaxContext = 0;

        /// <summary>"native" (default), "int8", "int4", "int4-g32", "int4-g64", "int4-g128":
        /// how the decoder projections are stored (quantized at load time, or as stored in an already-quantized folder).</summary>
        public string Weights = "native";

        /// <summary>Bytes of KV-cache memory for all sessions of the model together; 0: the
        /// backend's default.</summary>
        public ulong KvMemory = 0;

        /// <summary>When the KV memory is exhausted, a pass waits for sessions on other threads to
        /// free blocks (Dispose, Truncate, Reset) instead of throwing OutOfMemory. Only for hosts
        /// that run sessions on several threads: with one thread it would wait forever.</summary>
        public bool KvWait = false;

        /// <summary>Most prompt tokens of one session per forward pass (and prefill tokens of one
        /// batched pass); 0: 512. Larger chunks keep a GPU busier on long prompts and take more
        /// memory.</summary>
        public long PrefillChunk = 0;
    }

    /// <summary>Options for a new session (phi3_session_options).</summary>
    public sealed class SessionOptions
    {
        /// <summary>0: the model's.</summary>
        public long MaxContext = 0;

        /// <summary>Higher runs first when more work is queued than one batch takes (default 0).</summary>
        public int Priority = 0;
    }

    /// <summary>How a model's KV memory and batching scheduler are used (phi3_kv_usage).</summary>
    public sealed class KvUsage
    {
        /// <summary>Tokens per KV block.</summary>
        public long BlockTokens;
        /// <summary>Bytes of one block.</summary>
        public ulong BlockBytes;
        /// <summary>Blocks held by sessions (a block shared by forks counts once).</summary>
        public long BlocksInUse;
        /// <summary>Blocks allocated (in use or free for reuse).</summary>
        public long BlocksAllocated;
        /// <summary>What the budget allows; 0: no budget.</summary>
        public long MaxBlocks;
        /// <summary>Forward passes run.</summary>
        public ulong Steps;
        /// <summary>Sequences over all passes.</summary>
        public ulong Sequences;
        /// <summary>Most sequences in one pass.</summary>
        public long MaxBatch;
    }

    /// <summary>
    /// Sampling and stopping options, mapped to phi3_generate_options. The defaults equal
    /// phi3_generate_options_init's.
    /// </summary>
    public sealed class GenerateOptions
    {
        public int MaxTokens = 256;
        /// <summary>0: greedy.</summary>
        public float Temperature = 0.0f;
        /// <summary>0: off.</summary>
        public int TopK = 0;
        /// <summary>1: off.</summary>
        public float TopP = 1.0f;
        /// <summary>0: off.</summary>
        public float MinP = 0.0f;
        /// <summary>1: off.</summary>
        public float RepetitionPenalty = 1.0f;
        /// <summary>0: off.</summary>
        public float PresencePenalty = 0.0f;
        /// <summary>0: off.</summary>
        public float FrequencyPenalty = 0.0f;
        /// <summary>null: the library's default seeding.</summary>
        public ulong? Seed = null;
        /// <summary>Stop strings; null or empty: none.</summary>
        public IList<string> Stop = null;
        /// <summary>null: the model's eos ids and &lt;|end|&gt;; empty: no stop tokens.</summary>
        public IList<int> StopTokenIds = null;
    }

    /// <summary>The outcome of Phi3Session.Generate.</summary>
    public sealed class GenerateResult
    {
        public FinishReason FinishReason;
        public long PromptTokens;
        public long GeneratedTokens;
        public double TimeToFirstTokenS;
        public double PrefillTokensPerS;
        public double DecodeTokensPerS;
        /// <summary>Every piece of text the callback was given, concatenated.</summary>
        public string Text;
        /// <summary>The generated token ids, in order.</summary>
        public int[] Tokens;
    }

    /// <summary>A loaded model (phi3_model).</summary>
    public sealed class Phi3Model : SafeHandle
    {
        private Phi3Model() : base(IntPtr.Zero, true) { }

        private static Phi3Model Adopt(IntPtr handle)
        {
            var model = new Phi3Model();
            model.SetHandle(handle);
            return model;
        }

        public override bool IsInvalid
        {
            get { return handle == IntPtr.Zero; }
        }

        protected override bool ReleaseHandle()
        {
            Native.phi3_model_free(handle);
            return true;
        }

        /// <summary>Loads a model folder (config.json, safetensors, tokenizer.json).</summary>
        public static Phi3Model Load(string path, ModelOptions options = null)
        {
            if (path == null) throw new ArgumentNullException("path");
            byte[] p = Utf8.ToNative(path, "path");
            return LoadWith(options, (ref Native.ModelOptions o, out IntPtr m) =>
                Native.phi3_model_load(p, ref o, out m));
        }

        /// <summary>The built-in demo model (small, random weights, no files needed).</summary>
        public static Phi3Model LoadDemo(ModelOptions options = null)
        {
            return LoadWith(options, (ref Native.ModelOptions o, out IntPtr m) =>
                Native.phi3_model_load_demo(ref o, out m));
        }

        private delegate int LoadCall(ref Native.ModelOptions o, out IntPtr model);

        private static Phi3Model LoadWith(ModelOptions options, LoadCall call)
        {
            options = options ?? new ModelOptions();
            var o = new Native.ModelOptions();
            o.struct_size = (uint)Marshal.SizeOf(typeof(Native.ModelOptions));
            o.max_context = checked((UIntPtr)(ulong)options.MaxContext);
            o.kv_memory_bytes = options.KvMemory;
            o.kv_wait = options.KvWait ? 1 : 0;
            o.prefill_chunk = checked((UIntPtr)(ulong)options.PrefillChunk);
            IntPtr device = IntPtr.Zero;
            IntPtr weights = IntPtr.Zero;
            try
            {
                if (options.Device != null)
                {
                    device = Utf8.AllocNative(options.Device, "device");
                }
                if (options.Weights != null)
                {
                    weights = Utf8.AllocNative(options.Weights, "weights");
                }
                o.device = device;
                o.weights = weights;
                IntPtr model;
                Phi3Exception.Check(call(ref o, out model));
                return Adopt(model);
            }
            finally
            {
                if (device != IntPtr.Zero) Marshal.FreeHGlobal(device);
                if (weights != IntPtr.Zero) Marshal.FreeHGlobal(weights);
            }
        }

        /// <summary>Length of a logits vector.</summary>
        public int VocabSize
        {
            get { return checked((int)(ulong)Native.phi3_model_vocab_size(this)); }
        }

        /// <summary>The model's maximum context in tokens.</summary>
        public long MaxContext
        {
            get { return checked((long)(ulong)Native.phi3_model_max_context(this)); }
        }

        /// <summary>A snapshot of the KV pool and the scheduler's counters (phi3_model_kv_usage).</summary>
        public KvUsage KvUsage()
        {
            var u = new Native.KvUsage();
            u.struct_size = (uint)Marshal.SizeOf(typeof(Native.KvUsage));
            Phi3Exception.Check(Native.phi3_model_kv_usage(this, ref u));
            return new KvUsage
            {
                BlockTokens = (long)(ulong)u.block_tokens,
                BlockBytes = u.block_bytes,
                BlocksInUse = (long)(ulong)u.blocks_in_use,
                BlocksAllocated = (long)(ulong)u.blocks_allocated,
                MaxBlocks = (long)(ulong)u.max_blocks,
                Steps = u.steps,
                Sequences = u.sequences,
                MaxBatch = (long)(ulong)u.max_batch,
            };
        }

        /// <summary>Token ids of text; addSpecial adds the tokenizer's special tokens (BOS).</summary>
        public int[] Tokenize(string text, bool addSpecial = true)
        {
            if (text == null) throw new ArgumentNullException("text");
            byte[] utf8 = Utf8.ToNative(text, null);
            var len = (UIntPtr)(utf8.Length - 1);
            return Buffers.Fill<int>((int[] buf, UIntPtr cap, out UIntPtr needed) =>
                Native.phi3_tokenize(this, utf8, len, addSpecial ? 1 : 0, buf, cap, out needed));
        }

        /// <summary>The text of tokens.</summary>
        public string Detokenize(int[] tokens)
        {
            if (tokens == null) throw new ArgumentNullException("tokens");
            int[] ids = tokens.Length > 0 ? tokens : new int[1];
            var n = (UIntPtr)tokens.Length;
            byte[] bytes = Buffers.Fill<byte>((byte[] buf, UIntPtr cap, out UIntPtr needed) =>
                Native.phi3_detokenize(this, ids, n, buf, cap, out needed));
            return Encoding.UTF8.GetString(bytes);
        }

        /// <summary>A new, empty session on this model.</summary>
        public Phi3Session NewSession(SessionOptions options = null)
        {
            return Phi3Session.Create(this, options);
        }
    }

    /// <summary>A conversation: token history and KV cache (phi3_session).</summary>
    public sealed class Phi3Session : SafeHandle
    {
        private Phi3Session() : base(IntPtr.Zero, true) { }

        private static Phi3Session Adopt(IntPtr handle)
        {
            var session = new Phi3Session();
            session.SetHandle(handle);
            return session;
        }

        public override bool IsInvalid
        {
            get { return handle == IntPtr.Zero; }
        }

        protected override bool ReleaseHandle()
        {
            Native.phi3_session_free(handle);
            return true;
        }

        internal static Phi3Session Create(Phi3Model model, SessionOptions options)
        {
            if (model == null) throw new ArgumentNullException("model");
            options = options ?? new SessionOptions();
            var o = new Native.SessionOptions();
            o.struct_size = (uint)Marshal.SizeOf(typeof(Native.SessionOptions));
            o.max_context = checked((UIntPtr)(ulong)options.MaxContext);
            o.priority = options.Priority;
            IntPtr session;
            Phi3Exception.Check(Native.phi3_session_new(model, ref o, out session));
            return Adopt(session);
        }

        /// <summary>A session saved with Save, on model.</summary>
        public static Phi3Session Load(Phi3Model model, string path)
        {
            if (model == null) throw new ArgumentNullException("model");
            if (path == null) throw new ArgumentNullException("path");
            IntPtr session;
            Phi3Exception.Check(Native.phi3_session_load(model, Utf8.ToNative(path, "path"), out session));
            return Adopt(session);
        }

        /// <summary>Tokenizes text and appends it (the forward pass runs later).</summary>
        public void AppendText(string text)
        {
            if (text == null) throw new ArgumentNullException("text");
            byte[] utf8 = Utf8.ToNative(text, null);
            Phi3Exception.Check(Native.phi3_session_append_text(this, utf8, (UIntPtr)(utf8.Length - 1)));
        }

        /// <summary>Appends token ids and runs the model over them.</summary>
        public void AppendTokens(int[] tokens)
        {
            if (tokens == null) throw new ArgumentNullException("tokens");
            int[] ids = tokens.Length > 0 ? tokens : new int[1];
            Phi3Exception.Check(Native.phi3_session_append_tokens(this, ids, (UIntPtr)tokens.Length));
        }

        /// <summary>Appends token ids, runs the model over them and returns only the greedy
        /// choice after the last one (-1 when no logit is above -inf); on CUDA one id is copied
        /// back instead of the logits.</summary>
        public int AppendTokensGreedy(int[] tokens)
        {
            if (tokens == null) throw new ArgumentNullException("tokens");
            int[] ids = tokens.Length > 0 ? tokens : new int[1];
            int chosen;
            Phi3Exception.Check(Native.phi3_session_append_tokens_greedy(
                this, ids, (UIntPtr)tokens.Length, out chosen));
            return chosen;
        }

        /// <summary>Appends a chat message ("system", "user", "assistant").</summary>
        public void AppendMessage(string role, string content)
        {
            if (role == null) throw new ArgumentNullException("role");
            if (content == null) throw new ArgumentNullException("content");
            Phi3Exception.Check(Native.phi3_session_append_message(
                this, Utf8.ToNative(role, "role"), Utf8.ToNative(content, "content")));
        }

        /// <summary>Logits after the last token (VocabSize floats), running pending tokens first.</summary>
        public float[] Logits()
        {
            return Buffers.Fill<float>((float[] buf, UIntPtr cap, out UIntPtr needed) =>
                Native.phi3_session_logits(this, buf, cap, out needed));
        }

        /// <summary>
        /// Generates. onToken(text, token) is called for every piece of text (token -1 for text
        /// held back until the end); returning false stops (FinishReason.Callback). An exception
        /// thrown by onToken stops generation and is rethrown here.
        /// </summary>
        public GenerateResult Generate(GenerateOptions options = null, Func<string, int, bool> onToken = null)
        {
            options = options ?? new GenerateOptions();
            var call = new GenerateCall(onToken);
            // Kept in a local and GC.KeepAlive'd below: the delegate must outlive the native call.
            Native.TokenCallback callback = call.Invoke;

            var allocations = new List<IntPtr>();
            GCHandle stopIds = default(GCHandle);
            try
            {
                var o = new Native.GenerateOptions();
                o.struct_size = (uint)Marshal.SizeOf(typeof(Native.GenerateOptions));
                o.max_tokens = checked((uint)options.MaxTokens);
                o.temperature = options.Temperature;
                o.top_k = checked((uint)options.TopK);
                o.top_p = options.TopP;
                o.min_p = options.MinP;
                o.repetition_penalty = options.RepetitionPenalty;
                o.presence_penalty = options.PresencePenalty;
                o.frequency_penalty = options.FrequencyPenalty;
                o.has_seed = options.Seed.HasValue ? 1 : 0;
                o.seed = options.Seed.GetValueOrDefault();
                if (options.Stop != null && options.Stop.Count > 0)
                {
                    IntPtr array = Marshal.AllocHGlobal(IntPtr.Size * options.Stop.Count);
                    allocations.Add(array);
                    for (int i = 0; i < options.Stop.Count; i++)
                    {
                        if (options.Stop[i] == null) throw new ArgumentNullException("Stop[" + i + "]");
                        IntPtr s = Utf8.AllocNative(options.Stop[i], "Stop[" + i + "]");
                        allocations.Add(s);
                        Marshal.WriteIntPtr(array, i * IntPtr.Size, s);
                    }
                    o.stop = array;
                    o.n_stop = (UIntPtr)options.Stop.Count;
                }
                if (options.StopTokenIds != null)
                {
                    // Non-NULL with n = 0 means "no stop tokens": never pass NULL here.
                    var ids = new int[Math.Max(1, options.StopTokenIds.Count)];
                    options.StopTokenIds.CopyTo(ids, 0);
                    stopIds = GCHandle.Alloc(ids, GCHandleType.Pinned);
                    o.stop_token_ids = stopIds.AddrOfPinnedObject();
                    o.n_stop_token_ids = (UIntPtr)options.StopTokenIds.Count;
                }

                var r = new Native.GenerateResult();
                r.struct_size = (uint)Marshal.SizeOf(typeof(Native.GenerateResult));
                int status = Native.phi3_session_generate(this, ref o, callback, IntPtr.Zero, ref r);
                GC.KeepAlive(callback);
                if (call.Error != null)
                {
                    ExceptionDispatchInfo.Capture(call.Error).Throw();
                }
                if (status != (int)Phi3Status.Cancelled)
                {
                    Phi3Exception.Check(status);
                }
                return new GenerateResult
                {
                    FinishReason = status == (int)Phi3Status.Cancelled
                        ? FinishReason.Cancelled
                        : (FinishReason)r.finish_reason,
                    PromptTokens = (long)(ulong)r.prompt_tokens,
                    GeneratedTokens = (long)(ulong)r.generated_tokens,
                    TimeToFirstTokenS = r.time_to_first_token_s,
                    PrefillTokensPerS = r.prefill_tokens_per_s,
                    DecodeTokensPerS = r.decode_tokens_per_s,
                    Text = call.Text.ToString(),
                    Tokens = call.Tokens.ToArray(),
                };
            }
            finally
            {
                if (stopIds.IsAllocated) stopIds.Free();
                foreach (IntPtr p in allocations) Marshal.FreeHGlobal(p);
            }
        }

        /// <summary>The per-call state behind the native callback.</summary>
        private sealed class GenerateCall
        {
            private readonly Func<string, int, bool> onToken;
            public readonly StringBuilder Text = new StringBuilder();
            public readonly List<int> Tokens = new List<int>();
            public Exception Error;

            public GenerateCall(Func<string, int, bool> onToken)
            {
                this.onToken = onToken;
            }

            /// <summary>The phi3_token_callback. Never throws: an exception is kept and stops generation.</summary>
            public int Invoke(IntPtr userData, IntPtr utf8, UIntPtr len, int token)
            {
                if (Error != null)
                {
                    return 1; // already failed: do not call the user again
                }
                try
                {
                    string piece = Utf8.FromNative(utf8, len);
                    Text.Append(piece);
                    if (token >= 0)
                    {
                        Tokens.Add(token);
                    }
                    return onToken == null || onToken(piece, token) ? 0 : 1;
                }
                catch (Exception e)
                {
                    Error = e;
                    return 1;
                }
            }
        }

        /// <summary>Stops a running Generate or prefill on this session; callable from any thread.</summary>
        public void Cancel()
        {
            Native.phi3_session_cancel(this);
        }

        /// <summary>Number of tokens in the session.</summary>
        public int Length
        {
            get { return checked((int)(ulong)Native.phi3_session_len(this)); }
        }

        /// <summary>The session's token ids.</summary>
        public int[] Tokens()
        {
            return Buffers.Fill<int>((int[] buf, UIntPtr cap, out UIntPtr needed) =>
                Native.phi3_session_tokens(this, buf, cap, out needed));
        }

        /// <summary>Keeps the first nTokens tokens.</summary>
        public void Truncate(int nTokens)
        {
            Phi3Exception.Check(Native.phi3_session_truncate(this, checked((UIntPtr)(uint)nTokens)));
        }

        /// <summary>Removes every token.</summary>
        public void Reset()
        {
            Phi3Exception.Check(Native.phi3_session_reset(this));
        }

        /// <summary>The scheduling priority; setting it throws Busy while another thread is
        /// inside a call on this session.</summary>
        public int Priority
        {
            get { return Native.phi3_session_priority(this); }
            set { Phi3Exception.Check(Native.phi3_session_set_priority(this, value)); }
        }

        /// <summary>An independent copy (tokens, KV cache, priority); cheap: the KV blocks are
        /// shared copy-on-write.</summary>
        public Phi3Session Fork()
        {
            IntPtr session;
            Phi3Exception.Check(Native.phi3_session_fork(this, out session));
            return Adopt(session);
        }

        /// <summary>Writes the session to path (read back with Load).</summary>
        public void Save(string path)
        {
            if (path == null) throw new ArgumentNullException("path");
            Phi3Exception.Check(Native.phi3_session_save(this, Utf8.ToNative(path, "path")));
        }
    }

    /// <summary>Library-wide information.</summary>
    public static class Phi3Library
    {
        /// <summary>The library's version string, e.g. "0.1.0".</summary>
        public static string Version
        {
            get { return Utf8.FromNative(Native.phi3_version()); }
        }

        /// <summary>The ABI version of the loaded library.</summary>
        public static uint AbiVersion
        {
            get { return Native.phi3_abi_version(); }
        }
    }

    /// <summary>UTF-8 conversion by hand (no reliance on LPUTF8Str marshalling).</summary>
    internal static class Utf8
    {
        /// <summary>text as NUL-terminated UTF-8. A name makes an embedded NUL an error.</summary>
        public static byte[] ToNative(string text, string name)
        {
            if (name != null && text.IndexOf('\0') >= 0)
            {
                throw new Phi3Exception(Phi3Status.InvalidArgument, name + " contains a NUL character");
            }
            int n = Encoding.UTF8.GetByteCount(text);
            var bytes = new byte[n + 1];
            Encoding.UTF8.GetBytes(text, 0, text.Length, bytes, 0);
            return bytes;
        }

        /// <summary>text as NUL-terminated UTF-8 in unmanaged memory (free with FreeHGlobal).</summary>
        public static IntPtr AllocNative(string text, string name)
        {
            byte[] bytes = ToNative(text, name);
            IntPtr p = Marshal.AllocHGlobal(bytes.Length);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            return p;
        }

        /// <summary>A NUL-terminated UTF-8 string from native memory (null pointer: "").</summary>
        public static string FromNative(IntPtr p)
        {
            if (p == IntPtr.Zero) return "";
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            return FromNative(p, (UIntPtr)n);
        }

        /// <summary>len bytes of UTF-8 at p.</summary>
        public static string FromNative(IntPtr p, UIntPtr len)
        {
            int n = checked((int)(ulong)len);
            if (n == 0 || p == IntPtr.Zero) return "";
            var bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }
    }

    /// <summary>The (out, cap, out_len) convention: ask for the size, then fill.</summary>
    internal static class Buffers
    {
        public delegate int SizedCall<T>(T[] buffer, UIntPtr cap, out UIntPtr needed);

        public static T[] Fill<T>(SizedCall<T> call)
        {
            T[] buffer = null;
            UIntPtr needed;
            int status = call(null, UIntPtr.Zero, out needed);
            while (status == (int)Phi3Status.BufferTooSmall)
            {
                buffer = new T[checked((int)(ulong)needed)];
                status = call(buffer, (UIntPtr)buffer.Length, out needed);
            }
            Phi3Exception.Check(status);
            if (buffer == null) return new T[0];
            int n = checked((int)(ulong)needed);
            if (n < buffer.Length) Array.Resize(ref buffer, n);
            return buffer;
        }
    }

    /// <summary>The C declarations of include/phi3.h.</summary>
    internal static class Native
    {
        private const string Lib = "phi3";

        [StructLayout(LayoutKind.Sequential)]
        internal struct ModelOptions
        {
            public uint struct_size;
            public IntPtr device;          // const char *
            public UIntPtr max_context;    // size_t
            public IntPtr weights;         // const char *
            public ulong kv_memory_bytes;
            public int kv_wait;
            public UIntPtr prefill_chunk;  // size_t
        }

        [StructLayout(LayoutKind.Sequential)]
        internal struct SessionOptions
        {
            public uint struct_size;
            public UIntPtr max_context;    // size_t
            public int priority;
        }

        [StructLayout(LayoutKind.Sequential)]
        internal struct KvUsage
        {
            public uint struct_size;
            public UIntPtr block_tokens;     // size_t
            public ulong block_bytes;
            public UIntPtr blocks_in_use;    // size_t
            public UIntPtr blocks_allocated; // size_t
            public UIntPtr max_blocks;       // size_t
            public ulong steps;
            public ulong sequences;
            public UIntPtr max_batch;        // size_t
        }

        [StructLayout(LayoutKind.Sequential)]
        internal struct GenerateOptions
        {
            public uint struct_size;
            public uint max_tokens;
            public float temperature;
            public uint top_k;
            public float top_p;
            public float min_p;
            public float repetition_penalty;
            public float presence_penalty;
            public float frequency_penalty;
            public int has_seed;
            public ulong seed;
            public IntPtr stop;              // const char *const *
            public UIntPtr n_stop;
            public IntPtr stop_token_ids;    // const int32_t *
            public UIntPtr n_stop_token_ids;
        }

        [StructLayout(LayoutKind.Sequential)]
        internal struct GenerateResult
        {
            public uint struct_size;
            public int finish_reason;
            public UIntPtr prompt_tokens;
            public UIntPtr generated_tokens;
            public double time_to_first_token_s;
            public double prefill_tokens_per_s;
            public double decode_tokens_per_s;
        }

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        internal delegate int TokenCallback(IntPtr userData, IntPtr utf8, UIntPtr len, int token);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern uint phi3_abi_version();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern IntPtr phi3_version();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern IntPtr phi3_last_error();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern IntPtr phi3_status_str(int status);

        // The _init functions write the library's own struct size, so they take raw memory here.
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void phi3_model_options_init(IntPtr options);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void phi3_session_options_init(IntPtr options);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void phi3_generate_options_init(IntPtr options);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_model_load(byte[] path, ref ModelOptions options, out IntPtr model);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_model_load_demo(ref ModelOptions options, out IntPtr model);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void phi3_model_free(IntPtr model);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern UIntPtr phi3_model_vocab_size(Phi3Model model);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern UIntPtr phi3_model_max_context(Phi3Model model);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_model_kv_usage(Phi3Model model, ref KvUsage usage);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_new(Phi3Model model, ref SessionOptions options, out IntPtr session);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void phi3_session_free(IntPtr session);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_append_text(Phi3Session session, byte[] utf8, UIntPtr len);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_append_tokens(Phi3Session session, int[] tokens, UIntPtr n);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_append_tokens_greedy(
            Phi3Session session, int[] tokens, UIntPtr n, out int outToken);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_append_message(Phi3Session session, byte[] role, byte[] content);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_logits(Phi3Session session, [Out] float[] output, UIntPtr cap, out UIntPtr len);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_generate(Phi3Session session, ref GenerateOptions options,
            TokenCallback callback, IntPtr userData, ref GenerateResult result);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern void phi3_session_cancel(Phi3Session session);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern UIntPtr phi3_session_len(Phi3Session session);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_tokens(Phi3Session session, [Out] int[] output, UIntPtr cap, out UIntPtr len);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_truncate(Phi3Session session, UIntPtr nTokens);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_reset(Phi3Session session);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_fork(Phi3Session session, out IntPtr fork);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_save(Phi3Session session, byte[] path);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_load(Phi3Model model, byte[] path, out IntPtr session);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_set_priority(Phi3Session session, int priority);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_session_priority(Phi3Session session);

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_tokenize(Phi3Model model, byte[] utf8, UIntPtr len, int addSpecial,
            [Out] int[] output, UIntPtr cap, out UIntPtr len2);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)]
        internal static extern int phi3_detokenize(Phi3Model model, int[] tokens, UIntPtr n,
            [Out] byte[] output, UIntPtr cap, out UIntPtr len);
    }
}
