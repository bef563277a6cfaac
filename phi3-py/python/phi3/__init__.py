"""phi3: run Microsoft Phi-3 models from Python on phi3-rs, a Rust inference engine.

    import phi3
    model = phi3.Model("Phi-3-mini-4k-instruct")        # or phi3.Model.demo()
    reply = model.chat([{"role": "user", "content": "Hello"}], max_tokens=64)
    print(reply.text)

    session = model.session()                           # one conversation, one KV cache
    session.append_message("user", "Name three primes.")
    for chunk in session.stream(max_tokens=64):
        print(chunk, end="", flush=True)

Model work (tokenizing, prefill, decode, loading, saving) releases the GIL. Errors are
``Phi3Error`` subclasses, one per kind (``InvalidArgumentError`` is also a ``ValueError``,
``IoError`` an ``OSError``). ``python -m phi3 --help`` shows the command line.
"""

from ._phi3 import (
    BufferTooSmallError as BufferTooSmallError,
    BusyError as BusyError,
    CancelledError as CancelledError,
    ContextFullError as ContextFullError,
    DeviceError as DeviceError,
    GenerationResult as GenerationResult,
    GenerationStats as GenerationStats,
    InternalError as InternalError,
    InvalidArgumentError as InvalidArgumentError,
    IoError as IoError,
    KvUsage as KvUsage,
    Model as Model,
    ModelFormatError as ModelFormatError,
    OutOfMemoryError as OutOfMemoryError,
    Phi3Error as Phi3Error,
    Session as Session,
    Tokenizer as Tokenizer,
    TokenOutOfRangeError as TokenOutOfRangeError,
    TokenStream as TokenStream,
    UnsupportedError as UnsupportedError,
    __version__ as __version__,
    quantize as quantize,
)

__all__ = [
    "Model",
    "KvUsage",
    "quantize",
    "Tokenizer",
    "Session",
    "TokenStream",
    "GenerationResult",
    "GenerationStats",
    "Phi3Error",
    "InvalidArgumentError",
    "IoError",
    "ModelFormatError",
    "TokenOutOfRangeError",
    "ContextFullError",
    "OutOfMemoryError",
    "DeviceError",
    "CancelledError",
    "BusyError",
    "BufferTooSmallError",
    "UnsupportedError",
    "InternalError",
    "__version__",
]
