import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Policies run one thread per actor (Ray sets OMP_NUM_THREADS=1); on a shared 2-core
    machine a second intra-op thread makes small tensor ops wait for a busy core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
