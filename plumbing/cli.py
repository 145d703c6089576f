"""The entry points' contract with the shell: a problem with what a user typed or put on disk is one line on
stderr and exit status 2, never a traceback (VIREID_TRACEBACK=1 shows the traceback, for a bug report).

    if __name__ == "__main__":
        run(main, "train.py")
"""
import os
import sys

from plumbing import distributed


def run(main, program, argv=None):
    """main(argv) with its errors turned into one line each: a refused flag or file (SystemExit with a message,
    ValueError, OSError), a loss that went non-finite (FloatingPointError), an interruption (exit status 130),
    and under torchrun another rank's stop or a timed-out collective (RuntimeError)."""
    show = bool(os.environ.get("VIREID_TRACEBACK"))
    try:
        return main(argv)
    except (ValueError, OSError, FloatingPointError) as err:
        if show:
            raise
        print(f"{program}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as stop:           # a refused flag or run folder: its message, exit status 2
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            raise SystemExit(2) from None
        raise
    except KeyboardInterrupt:
        print(f"{program}: interrupted; the same command resumes from the last finished epoch", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as err:          # under torchrun: another rank stopped, or a collective timed out
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 or show:
            raise
        print(f"{program} (rank {os.environ.get('RANK')}): error: {str(err).splitlines()[0][:500]}; every rank "
              f"stops; the same command resumes from the last finished epoch", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        distributed.close()
