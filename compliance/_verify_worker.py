"""Worker process of :func:`compliance.verify.verify_log` for large logs: checks chunks of records.

Started as ``python -m compliance._verify_worker`` (not through multiprocessing, so that the caller's main
script is never re-imported and no threads are forked). It reads pickled jobs ``(db_uri, start, stop, sizes)``
from stdin and writes one pickled ``_Chunk`` per job to stdout, until stdin closes. Both ends of the pipes are
this package, so pickle is safe here; the database is opened read-only.
"""

from __future__ import annotations

import pickle
import sys


def main() -> None:
    from compliance.verify import _scan

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            job = pickle.load(stdin)
        except EOFError:
            return
        pickle.dump(_scan(*job), stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    main()
