"""What every script shares: logging setup and the exit-code contract.

Exit codes: 0 success, 2 bad input or usage (one line per problem on stderr, no traceback),
1 anything else (with its traceback, because that is a bug to report).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from fasttune import UserError



def setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False, markup=False)],
        force=True,  # unsloth installs a root handler at import; ours replaces it
    )
    # Quiet the libraries' own chatter; our modules log what a user needs.
    # llama-cpp-python routes llama.cpp's own log (per-tensor quantize lines, model dumps) here.
    for name in ("httpx", "urllib3", "filelock", "datasets", "gguf", "llama-cpp-python"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def run(main) -> None:
    """Call main(); turn a UserError into `error: ...` and exit 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
