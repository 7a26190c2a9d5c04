"""The error training code raises for a problem a person must fix (a bad configuration, no data,
an unwritable checkpoint). Library code raises it, never SystemExit: how a process ends is the
command line's decision (training.train.main prints `error: ...` and returns 1)."""


class TrainingError(Exception):
    """A failure of training set-up or checkpointing; the message names the problem and its fix."""
