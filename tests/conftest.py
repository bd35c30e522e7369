"""Test setup: no network, a private cache folder, tiny models built from config."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "LORA_TRAINER_CACHE" not in os.environ:
    # A private cache for this run, removed when the run ends (each run's is ~17 MB).
    os.environ["LORA_TRAINER_CACHE"] = tempfile.mkdtemp(prefix="lora_trainer_test_cache_")
    atexit.register(shutil.rmtree, os.environ["LORA_TRAINER_CACHE"], ignore_errors=True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands run in process (train, demo, bench) keep the tests' one thread (lora_trainer.threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests run tiny models, whose time goes into thread hand-offs rather than arithmetic: one
# thread is several times faster, and much faster still when the CPU is shared.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    # The CUDA-only checks are a tier of their own (lora_trainer/bench/gpu_rows.sh runs them on a GPU
    # machine); on a CPU machine they are not part of the suite: deselected, not skipped.
    if has_cuda:
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


@pytest.fixture(autouse=True, scope="module")
def _no_finished_run_from_an_earlier_module() -> Iterator[None]:
    """Each test module starts with an empty job registry: the app and the tab show the last run
    when a page loads (its folder, its settings), so a run that an earlier module finished would
    fill another module's page with that run's folder."""
    yield
    from lora_trainer import jobs

    jobs.clear_finished()


@pytest.fixture(autouse=True)
def _no_start_hook_of_an_earlier_test() -> Iterator[None]:
    """A WebUI's tab built by a test remembers where that test's runs go (a note in its default
    output folder); the next test's runs must not write there."""
    yield
    from lora_trainer import jobs

    jobs.clear_start_hooks()


@pytest.fixture(scope="module")
def webui():  # -> SimpleNamespace of the stand-in WebUI modules
    """The stand-in A1111 WebUI (tests/webui_stub) with a tiny real-LDM model loaded, for one
    test module; the stand-in is taken off sys.path again afterwards."""
    import a1111_env

    w = a1111_env.enter()
    w.model = w.tiny_ldm.TinyLatentDiffusion(seed=0)
    yield w
    a1111_env.leave()


@pytest.fixture(scope="module")
def forge():  # -> SimpleNamespace of the stand-in Forge modules
    """The stand-in Forge (tests/forge_stub) with tiny SD1 and SDXL engines, for one test module;
    taken off sys.path again afterwards."""
    import forge_env

    w = forge_env.enter()
    with torch.inference_mode():  # Forge Neo loads checkpoints in inference mode
        w.sd1 = w.tiny_forge.StableDiffusion(seed=0)
    yield w
    forge_env.leave()
