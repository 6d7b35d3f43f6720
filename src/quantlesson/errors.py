"""The one exception type the lesson raises for input it cannot use.

Every message says what was wrong *and what to do*, because learners meet
these errors in a notebook, far from the code that raised them.
"""


class LessonError(ValueError):
    """Bad input to a `quantlesson` function: the message says how to fix it."""
