"""Test-wide guards: fully offline (HF_HUB_OFFLINE=1 and no non-loopback sockets) and one shared
DMDR_HOME per test session, so the tiny models are built once."""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("DMDR_HOME"):
    os.environ["DMDR_HOME"] = tempfile.mkdtemp(prefix="dmdr-test-home-")


class NetworkAccessError(RuntimeError):
    pass


def _is_local(address) -> bool:
    if not isinstance(address, tuple) or not address:
        return True  # AF_UNIX paths and similar
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: would need DNS, i.e. the network


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        raise NetworkAccessError(f"test tried to reach the network: {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        raise NetworkAccessError(f"test tried to reach the network: {address!r}")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The tiny networks run several times faster on one thread than on two contended ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dmdr_home() -> str:
    return os.environ["DMDR_HOME"]


@pytest.fixture(scope="session")
def tiny_sd3_dir(dmdr_home):
    from dmdr_cli.families.tiny import ensure_tiny

    return ensure_tiny("sd3")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(dmdr_home):
    from dmdr_cli.families.tiny import ensure_tiny

    return ensure_tiny("sdxl")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + tokenizer folder (``dmdr_cli.families.tiny.save_tiny_clip``)."""
    from dmdr_cli.families.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
