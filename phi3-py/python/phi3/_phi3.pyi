"""Type stubs of phi3._phi3, the native module (PyO3) behind the phi3 package."""

import os
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union, final

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = [
    "__version__",
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
    "Model",
    "KvUsage",
    "Tokenizer",
    "Session",
    "GenerationResult",
    "GenerationStats",
    "TokenStream",
    "quantize",
]

_Path = Union[str, "os.PathLike[str]"]
_Content = Union[str, None, Sequence[Mapping[str, str]]]
_Message = Mapping[str, _Content]
_OnToken = Callable[[str, Optional[int]], Optional[bool]]

class Phi3Error(Exception):
    """Base class of every error raised by phi3."""

    kind: Optional[str]
    status_code: Optional[int]

class InvalidArgumentError(Phi3Error, ValueError): ...
class IoError(Phi3Error, OSError): ...
class ModelFormatError(Phi3Error): ...
class TokenOutOfRangeError(Phi3Error, ValueError): ...
class ContextFullError(Phi3Error): ...
class OutOfMemoryError(Phi3Error, MemoryError): ...
class DeviceError(Phi3Error): ...
class CancelledError(Phi3Error): ...
class BusyError(Phi3Error): ...
class BufferTooSmallError(Phi3Error): ...
class UnsupportedError(Phi3Error): ...
class InternalError(Phi3Error): ...

@final
class Tokenizer:
    """A tokenizer with transformers' ids; `model.tokenizer` or `Tokenizer.from_dir(path)`."""

    @staticmethod
    def from_dir(path: _Path) -> Tokenizer: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def apply_chat_template(
        self,
        messages: Sequence[_Message],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> Union[List[int], str]: ...
    @property
    def vocab_size(self) -> int: ...
    def token_to_id(self, token: str) -> Optional[int]: ...
    def id_to_token(self, id: int) -> Optional[str]: ...
    def is_special(self, id: int) -> bool: ...
    @property
    def bos_token_id(self) -> Optional[int]: ...
    @property
    def eos_token_id(self) -> Optional[int]: ...
    @property
    def bos_token(self) -> Optional[str]: ...
    @property
    def eos_token(self) -> Optional[str]: ...
    @property
    def chat_template(self) -> str: ...

@final
class Model:
    """A Phi-3 model on a device; thread-safe, one Session per conversation."""

    def __new__(
        cls,
        path: _Path,
        device: str = "auto",
        weights: str = "native",
        max_context: Optional[int] = None,
        *,
        kv_memory: Optional[int] = None,
        kv_wait: bool = False,
        prefill_chunk: Optional[int] = None,
    ) -> Model: ...
    @staticmethod
    def demo(
        device: str = "auto",
        max_context: Optional[int] = None,
        weights: str = "native",
        *,
        kv_memory: Optional[int] = None,
        kv_wait: bool = False,
        prefill_chunk: Optional[int] = None,
    ) -> Model: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def device(self) -> str: ...
    @property
    def weights(self) -> str: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def path(self) -> Optional[str]: ...
    @property
    def max_context(self) -> int: ...
    @property
    def prefill_chunk(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def session(self, max_context: Optional[int] = None, *, priority: int = 0) -> Session: ...
    def kv_usage(self) -> KvUsage: ...
    def chat(
        self,
        messages: Sequence[_Message],
        stream: bool = False,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        on_token: Optional[_OnToken] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        stop_token_ids: Optional[Sequence[int]] = None,
        logit_bias: Optional[Dict[int, float]] = None,
        skip_special_tokens: bool = True,
    ) -> Union[GenerationResult, TokenStream]: ...

@final
class Session:
    """A conversation: token history, KV cache, sampler state; one thread at a time."""

    def append_tokens(self, ids: Sequence[int]) -> npt.NDArray[np.float32]: ...
    def append_tokens_greedy(self, ids: Sequence[int]) -> Optional[int]: ...
    def append_text(self, text: str) -> None: ...
    def append_message(self, role: str, content: str) -> None: ...
    def logits(self) -> npt.NDArray[np.float32]: ...
    def generate(
        self,
        max_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        on_token: Optional[_OnToken] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        stop_token_ids: Optional[Sequence[int]] = None,
        logit_bias: Optional[Dict[int, float]] = None,
        skip_special_tokens: bool = True,
    ) -> GenerationResult: ...
    def stream(
        self,
        max_tokens: int = 256,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[str, Sequence[str], None] = None,
        on_token: Optional[_OnToken] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        stop_token_ids: Optional[Sequence[int]] = None,
        logit_bias: Optional[Dict[int, float]] = None,
        skip_special_tokens: bool = True,
    ) -> TokenStream: ...
    def cancel(self) -> None: ...
    @property
    def tokens(self) -> List[int]: ...
    def __len__(self) -> int: ...
    @property
    def max_context(self) -> int: ...
    @property
    def priority(self) -> int: ...
    @priority.setter
    def priority(self, priority: int) -> None: ...
    @property
    def model(self) -> Model: ...
    def fork(self) -> Session: ...
    def truncate(self, n_tokens: int) -> None: ...
    def reset(self) -> None: ...
    def save(self, path: _Path) -> None: ...
    @staticmethod
    def load(model: Model, path: _Path) -> Session: ...

@final
class TokenStream(Iterator[str]):
    """Text chunks of a generation running on a worker thread."""

    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> TokenStream: ...
    def __exit__(self, *args: object) -> bool: ...
    @property
    def result(self) -> Optional[GenerationResult]: ...
    @property
    def finish_reason(self) -> Optional[str]: ...
    @property
    def session(self) -> Session: ...

@final
class KvUsage:
    """A snapshot of a model's KV memory and batching scheduler (`model.kv_usage()`)."""

    @property
    def block_tokens(self) -> int: ...
    @property
    def block_bytes(self) -> int: ...
    @property
    def blocks_in_use(self) -> int: ...
    @property
    def blocks_allocated(self) -> int: ...
    @property
    def max_blocks(self) -> Optional[int]: ...
    @property
    def steps(self) -> int: ...
    @property
    def sequences(self) -> int: ...
    @property
    def max_batch(self) -> int: ...
    def as_dict(self) -> Dict[str, Optional[int]]: ...

@final
class GenerationStats:
    """Token counts and speeds of one generation."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def generated_tokens(self) -> int: ...
    @property
    def time_to_first_token(self) -> float: ...
    @property
    def prefill_tokens_per_s(self) -> float: ...
    @property
    def decode_tokens_per_s(self) -> float: ...
    def as_dict(self) -> Dict[str, float]: ...

@final
class GenerationResult:
    """What a generation produced."""

    @property
    def text(self) -> str: ...
    @property
    def tokens(self) -> List[int]: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def stats(self) -> GenerationStats: ...

def quantize(
    model: _Path,
    out: _Path,
    weights: str = "int4",
    awq: bool = False,
    lm_head: bool = False,
) -> Dict[str, object]:
    """Write a copy of `model` with int8/int4 projections into the new folder `out`."""
    ...
