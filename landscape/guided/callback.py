"""Guided dropout for a Hugging Face ``Trainer`` user, in one line."""

from .schedule import apply


def callback(schedule):
    """A ``transformers.TrainerCallback`` that applies ``schedule`` when training begins.

    One line for a Trainer user: ``Trainer(..., callbacks=[schedule.callback(s)])``.

    Args:
        schedule: anything ``schedule.apply`` accepts.

    Returns:
        The callback.
    """
    from transformers import TrainerCallback

    class GuidedDropoutCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                apply(model, schedule)

    return GuidedDropoutCallback()
