"""Guided dropout for a Hugging Face ``Trainer`` user, in one line."""

from transformers import TrainerCallback

from .schedule import Schedule, apply


def callback(schedule: Schedule) -> TrainerCallback:
    """A ``transformers.TrainerCallback`` that applies ``schedule`` when training begins.

    One line for a Trainer user: ``Trainer(..., callbacks=[landscape.schedule_callback(s)])``.

    Args:
        schedule: a schedule, as ``schedule.apply`` takes it.

    Returns:
        The callback.
    """
    class GuidedDropoutCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                apply(model, schedule)

    return GuidedDropoutCallback()
