"""The one exception type that means "the user gave bad input"."""


class UsageError(Exception):
    """Bad input from the user (a missing file, an unknown model, a value out of range).

    The command line prints the message as one line and exits with code 2; the Python API lets
    it propagate.  Messages say what is wrong and what to do about it.
    """


class SettingsMismatch(UsageError):
    """An existing output was computed with other settings (or cannot be read as one of ours).

    The library refuses to replace it unless asked to (``overwrite=True``); the command line adds
    how to ask (``--overwrite``) or to choose another output.
    """


class NumericsChanged(UsageError):
    """A partial result was begun under other code numerics than this code computes with for its model.

    Resuming it would mix numbers of two forwards (``numerics.CHANGES``: e.g. rotary frequencies
    rounded to bfloat16 then, kept in float32 now); only starting it over is right.
    """


class NumericsMismatch(NumericsChanged, SettingsMismatch):
    """``NumericsChanged`` of an output that ``overwrite=True`` starts over (the command line names ``--overwrite``)."""


class NewHeadRefused(UsageError):
    """A checkpoint lacks weights of the model its objective needs (e.g. a bare encoder's MLM head).

    The library refuses unless ``allow_new_head=True``; the command line names ``--allow-new-head``.
    """


class OutputRefused(SettingsMismatch):
    """An existing output holds something this stage did not write.

    Another kind of file, or a figure of something else; ``overwrite=True`` replaces it.

    Args:
        path: the output.
        reason: the message without the remedy, which the command line words with its flags.
    """

    def __init__(self, path, reason):
        super().__init__(f"{reason}; pass overwrite=True to replace it, or write elsewhere")
        self.path, self.reason = path, reason


class OutputBusy(UsageError):
    """Another live process is writing the same output (it holds the output's lock).

    Args:
        path: the output.
        reason: the message, naming the other process.
    """

    def __init__(self, path, reason):
        super().__init__(f"{reason}; wait for it to finish or write elsewhere")
        self.path, self.reason = path, reason


class OutputUnwritable(UsageError):
    """An output that could not be written at the end, refused before any work.

    A folder, a wrong suffix or an unwritable place is refused before any work
    (``files.check_output_path``).  ``what`` names the output as the caller did (a parameter such as
    ``out``), ``path`` is it, and ``detail`` the rest of the message, so the command line can name
    its own flag instead.
    """

    def __init__(self, what, path, detail):
        super().__init__(f"{what} '{path}'{detail}")
        self.what, self.path, self.detail = what, path, detail


class SamePath(UsageError):
    """Two settings of one call name the same file (``files.check_distinct_paths``).

    ``names`` are the settings as the caller named them (``out``, ``runs_out``), ``paths`` their
    values, so the command line can name its own flags instead.
    """

    def __init__(self, names, paths):
        super().__init__(f"{names[0]} '{paths[0]}' and {names[1]} '{paths[1]}' are the same file; "
                         "give each its own")
        self.names, self.paths = tuple(names), tuple(paths)


class MissingSetting(UsageError):
    """A setting that another one needs was not given (a Fisher subset without a Fisher file).

    ``needed`` is the missing setting's library name, so the command line can name its option.
    """

    def __init__(self, message, needed):
        super().__init__(message)
        self.needed = needed


class SettingsRefused(UsageError):
    """Settings of one call that cannot go together, named so that each caller can say them its own way.

    ``template`` is the message with each setting's name in braces ('{kind} hessian and {to}
    contradict each other'); ``values`` fill the other braces.  ``str()`` names the settings as the
    library does, ``worded(name_of)`` as the caller does (the command line: its options).
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        super().__init__(self.worded(lambda name: name))

    def worded(self, name_of) -> str:
        """The message with each setting's name given by ``name_of(name)``."""
        import string

        names = {field for _, field, _, _ in string.Formatter().parse(self.template)
                 if field and field not in self.values}
        return self.template.format(**{name: name_of(name) for name in names}, **self.values)
