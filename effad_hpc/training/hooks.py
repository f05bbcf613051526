"""What a training stage tells the code around it while it trains: one event per validation pass.

The loops (:func:`~effad_hpc.training.loop.fit`, :func:`~effad_hpc.training.steps.fit_steps`)
and the fitted baselines announce a :class:`Validated` event after every validation pass; a
listener installed with :func:`listening` (a sweep trial reporting to Ray Tune) sees the model as
it is at that point and may add values to the pass's log row, which is then written to
``log.csv``. Without a listener nothing happens: training does not depend on who listens, except
a stage that selects its model by a score on the synthetic-anomaly validation set, which the
training layer cannot compute and a scorer installed with :func:`scoring` adds (``selects_by``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from effad_hpc.utils.device import random_state_kept


@dataclass(frozen=True)
class Validated:
    """A finished validation pass of stage ``stage`` for ``category``."""

    stage: str
    category: str
    round: int
    """Validation passes done so far (1 for the first), counting a resumed run's earlier ones."""
    rounds: int
    """Validation passes a run to the last epoch or step makes (early stopping may end it sooner)."""
    row: dict
    """The pass's log row (validation value, training losses, ...); a listener may add entries."""
    model: nn.Module
    """The stage's model as it is now (the listener must leave its weights and mode as it found them)."""
    ready: Callable[[], None] | None = None
    """Brings ``model`` into its inference state as if training ended now (the map normalisation of
    EfficientAD and of the hybrid, which the stage otherwise sets only after its last step)."""
    selects_by: str | None = None
    """The ``row`` entry the stage chooses its model by when that is not its own validation loss
    (``select_by``, a ``val_synthetic_*`` score): a scorer installed with :func:`scoring`
    (:func:`effad_hpc.evaluation.synthetic_validation.selecting`) adds it."""


class ValidationListener(Protocol):
    def __call__(self, event: Validated) -> None: ...


_scorers: list[ValidationListener] = []
_listeners: list[ValidationListener] = []


@contextmanager
def _installed(registry: list[ValidationListener], listener: ValidationListener) -> Iterator[None]:
    registry.append(listener)
    try:
        yield
    finally:
        registry.remove(listener)


def listening(listener: ValidationListener) -> AbstractContextManager[None]:
    """Call ``listener`` on every validation pass of every stage trained inside this block."""
    return _installed(_listeners, listener)


def scoring(scorer: ValidationListener) -> AbstractContextManager[None]:
    """Let ``scorer`` add the ``selects_by`` values of the stages trained inside this block; it is
    called before every listener, so a listener finds the pass already scored."""
    return _installed(_scorers, scorer)


def scorer_installed() -> bool:
    """Whether a stage that selects by a score can get one (checked before it trains an epoch)."""
    return bool(_scorers)


def announce(event: Validated) -> None:
    """Call the scorers, then the listeners, with the random state forked: what they draw (a
    backbone's random initialisation before its weights load, a DataLoader's base seed, ...)
    leaves the stage's next dropout masks as they would be without them, so a scored run trains
    the same model as one nobody listens to."""
    called = [*_scorers, *_listeners]
    if not called:
        return
    with random_state_kept():
        for listener in called:
            listener(event)


def rounds(progress: int, total: int, every: int) -> tuple[int, int]:
    """(validation passes after ``progress`` of ``total`` epochs or steps, passes of a full run)
    for a loop that validates every ``every`` and after the last one."""
    return -(-progress // every), -(-total // every)
