"""What `swarm-generate` says on stderr while it works: a long prompt's prefill, a cut-short output.

Used by petals_like.cli (`--local`) and petals_like.distributed_cli (through the swarm).
"""

from __future__ import annotations

import sys
import time

PROGRESS_EVERY_S = 5.0  # a prefill that takes longer than this reports on stderr this often


class PrefillProgress:
    """`on_prefill` callback: "prefill: 2048/7981 prompt tokens (11 s)", every few seconds."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(f"prefill: {done}/{total} prompt tokens ({now - self.t0:.0f} s)", file=sys.stderr)


def cut_notice(requested: int, generated: int, prompt_len: int, context: int) -> str | None:
    """The line that says the output stopped at the context's end, or None if it did not."""
    if generated >= requested or prompt_len + generated < context:
        return None
    return (
        f"note: output cut at the model's context of {context} tokens: prompt {prompt_len} + "
        f"{generated} new, {requested} asked"
    )
