"""Fixtures of the meta-architecture tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread: PyTorch's CPU kernels then take one path per call (with more, a parallel split can
    leave a few elements to a scalar tail that rounds differently), so results can be compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
