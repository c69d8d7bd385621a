"""``bubuh serve`` collects the youngest GC generation less often and freezes what start-up loaded;
0 keeps Python's own setting."""

import gc

import pytest

from services.kernel import event_loop
from services.kernel.settings import Settings


@pytest.fixture
def restored_gc():
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_the_default_raises_generation_zero_and_freezes_startup(restored_gc) -> None:
    assert Settings().gc_gen0_threshold == 50_000
    before = gc.get_threshold()
    event_loop.tune_gc(50_000)
    assert gc.get_threshold() == (50_000, before[1], before[2])
    assert gc.get_freeze_count() > 0


def test_zero_leaves_python_alone(restored_gc) -> None:
    before = gc.get_threshold()
    event_loop.tune_gc(0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
