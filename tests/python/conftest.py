"""Shared fixtures of the Python tests: the demo model, fixture paths, the real tokenizer."""

import os
import pathlib

import pytest

import phi3

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TOKENIZER_DIR = pathlib.Path(
    os.environ.get("PHI3_TOKENIZER_DIR", str(ROOT.parent / "shared" / "phi3-tokenizer"))
)


@pytest.fixture(scope="session")
def demo() -> phi3.Model:
    return phi3.Model.demo(device="cpu")


@pytest.fixture
def chat_session(demo: phi3.Model) -> phi3.Session:
    s = demo.session()
    s.append_message("user", "Hello")
    return s


@pytest.fixture(scope="session")
def real_tokenizer_dir() -> pathlib.Path:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"real Phi-3 tokenizer not found at {TOKENIZER_DIR}")
    return TOKENIZER_DIR
