"""The one error type users see: bad input or config, reported in one line with exit code 2; and
Ctrl-C or SIGTERM, reported in one line with exit code 130 or 143."""

import argparse
import contextlib
import functools
import os
import signal
import sys
import threading

INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
STOPPING_SIGNALS = {signal.SIGINT: ("interrupted", INTERRUPTED), signal.SIGTERM: ("terminated", 128 + signal.SIGTERM)}


class UserError(Exception):
    """A problem with the user's files, flags or config (not a bug): one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in one line, `error: ...` and exit code 2, like every other bad input
    (argparse prints its usage first); the usage is one --help away."""

    def error(self, message):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


def cli_main(main):
    """Wrap a CLI entry point so a UserError prints `error: ...` on stderr and exits 2, and Ctrl-C prints
    `interrupted` and exits 130 (outputs are written atomically: nothing is left half-written)."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(INTERRUPTED) from None

    return wrapper


@contextlib.contextmanager
def exit_on_signal(farewell):
    """While inside, Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption) ends the process at once, as
    a kill would, with `farewell(word)`'s line on stderr ("interrupted" or "terminated") and exit code
    130 or 143. A KeyboardInterrupt would first wait for the device to finish its chunk, then unwind
    through XLA's and Orbax's threads: a traceback flood, or a crash at exit. The signal wakes a
    watcher thread through Python's wakeup fd, so the main thread may stay blocked. A signal ignored
    on entry (SIGINT in a background job), or handled from C (Python cannot restore that), is left
    alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = {number: exit for number, exit in STOPPING_SIGNALS.items()
               if signal.getsignal(number) not in (signal.SIG_IGN, None)}
    read, write = os.pipe()
    os.set_blocking(write, False)
    leaving = threading.Event()  # set: a signal is the restored handler's (one exit path, never two)

    def watch():
        while byte := os.read(read, 1):  # b"": the pipe closed on leaving
            if byte[0] in handled and not leaving.is_set():
                word, code = handled[byte[0]]
                try:
                    line = farewell(word)
                except Exception as err:  # the process is ending anyway: say why the farewell failed
                    line = f"{word} ({type(err).__name__}: {err})"
                sys.stdout.flush()
                print(line, file=sys.stderr, flush=True)
                os._exit(code)

    watcher = threading.Thread(target=watch, name="exit-on-signal", daemon=True)
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    previous = {number: signal.signal(number, lambda *_: None) for number in handled}
    watcher.start()
    try:
        yield
    finally:
        leaving.set()
        for number, handler in previous.items():
            signal.signal(number, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(write)
        watcher.join()
        os.close(read)
