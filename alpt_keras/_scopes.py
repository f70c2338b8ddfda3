"""Thread-local settings scoped by `with` blocks.

Thread-local because MirroredStrategy runs each replica's step in its own
thread. Used only where no argument can reach the code that reads the
setting: variable creation inside Keras's `add_weight` (`row_variables`,
for `RowPartitioner`) and the model's own call (`step_size_pass`).
"""

import contextlib
import threading

_SCOPE = threading.local()


@contextlib.contextmanager
def scoped(name, value):
    """Sets the thread-local `name` to `value` inside (nests, restores)."""
    previous = getattr(_SCOPE, name, None)
    setattr(_SCOPE, name, value)
    try:
        yield
    finally:
        setattr(_SCOPE, name, previous)


def current(name):
    """The innermost value of `name` in this thread, or `None`."""
    return getattr(_SCOPE, name, None)
